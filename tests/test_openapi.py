"""The shipped OpenAPI description: true to the routes, to real answers, and fuzzed."""

from __future__ import annotations

import json
import subprocess
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from deploy_agent.api import openapi_document
from deploy_agent.app import create_app
from tests.agent_process import AgentProcess, get_json, installed, post_json
from tests.conftest import TEST_IMAGE, make_config, remove_test_containers
from tests.test_api_docker import deploy

SPEC: dict[str, Any] = json.loads(openapi_document())
Client = TestClient[web.Request, web.Application]


def validate(instance: Any, schema_name: str | None = None, schema: Any = None) -> None:
    """Validate against a component schema (refs resolved within the document)."""
    root = {"components": SPEC["components"],
            **(schema if schema is not None else {"$ref": f"#/components/schemas/{schema_name}"})}
    jsonschema.Draft202012Validator(root).validate(instance)


def response_schema(path: str, method: str, status: int) -> Any:
    responses = SPEC["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} answered undocumented {status}"
    return responses[str(status)]["content"]["application/json"]["schema"]


class TestDocument:
    """The description covers exactly the routes the app serves."""

    def test_is_openapi_3_1_and_valid_json_schema(self) -> None:
        assert SPEC["openapi"].startswith("3.1")
        for schema in SPEC["components"]["schemas"].values():
            jsonschema.Draft202012Validator.check_schema(schema)

    def test_paths_match_routes(self, tmp_path: Path) -> None:
        app = create_app(make_config(tmp_path))
        routes = {(route.method.lower(), route.resource.canonical if route.resource else "")
                  for route in app.router.routes() if route.method != "HEAD"}
        documented = {(method, path) for path, item in SPEC["paths"].items() for method in item}
        assert routes == documented

    def test_the_shipped_document_is_the_generators_output(self) -> None:
        from deploy_agent.openapi import DOCUMENT, app_routes, build_document, render

        assert DOCUMENT.read_text() == render(build_document(app_routes())), (
            "deploy_agent/openapi.json is stale: run python -m deploy_agent.openapi")

    def test_a_route_nobody_described_stops_the_generator(self) -> None:
        from deploy_agent.openapi import app_routes, build_document

        with pytest.raises(KeyError, match="/new"):
            build_document([*app_routes(), ("GET", "/new")])
        with pytest.raises(ValueError, match="/gpus"):
            build_document([r for r in app_routes() if r[1] != "/gpus"])

    def test_rules_come_from_the_converter_once(self) -> None:
        """Both deploy forms and the stop body carry the converter's own patterns and limits."""
        from deploy_agent.convert import IMAGE_RE, NAME_RE

        schemas = SPEC["components"]["schemas"]
        flat, manifest = schemas["FlatDeploy"]["properties"], schemas["ManifestDeploy"]["properties"]
        for name in (flat["name"], manifest["name"], schemas["StopRequest"]["properties"]["name"]):
            assert name["pattern"] == NAME_RE.pattern
        assert manifest["deploy"]["properties"]["port"] == flat["port"]
        assert flat["port"]["minimum"] == 1 and flat["port"]["maximum"] == 65535
        assert IMAGE_RE.match("a" * 200) and flat["image"]["maxLength"] == 255

    def test_schemas_name_exactly_the_models_fields(self) -> None:
        """The models' field names, as the document shows them (a second check on the generator)."""
        import attrs

        from deploy_agent.convert import MANIFEST_DEPLOY, MANIFEST_REQUIRES, MANIFEST_TOP, REQUEST_KEYS
        from deploy_agent.events import KINDS, Event
        from deploy_agent.gpus import GpuView, VramAccounting
        from deploy_agent.models import (
            DeployAnswer,
            DeploySpec,
            DryRunAnswer,
            HealthAnswer,
            ServiceView,
            Status,
        )

        schemas = SPEC["components"]["schemas"]

        def names(model: Any) -> set[str]:
            return {field.name for field in attrs.fields(model)}

        assert set(schemas["FlatDeploy"]["properties"]) == names(DeploySpec) | set(REQUEST_KEYS)
        manifest = schemas["ManifestDeploy"]["properties"]
        assert set(manifest) == MANIFEST_TOP
        assert set(manifest["deploy"]["properties"]) == set(MANIFEST_DEPLOY)
        assert set(manifest["requires"]["properties"]) == set(MANIFEST_REQUIRES)
        assert tuple(schemas["Event"]["properties"]["kind"]["enum"]) == KINDS
        assert schemas["Service"]["properties"]["status"]["enum"] == list(typing.get_args(Status))
        assert (schemas["Gpu"]["properties"]["vram_accounting"]["enum"]
                == list(typing.get_args(VramAccounting)))
        for schema, model in (("Health", HealthAnswer), ("Service", ServiceView), ("Gpu", GpuView),
                              ("DeployAnswer", DeployAnswer), ("Event", Event),
                              ("DryRunAnswer", DryRunAnswer)):
            assert set(schemas[schema]["properties"]) == names(model), schema
            assert set(schemas[schema].get("required", [])) <= names(model), schema

    async def test_served_at_openapi_json(self, aiohttp_client: Any, tmp_path: Path) -> None:
        client = await aiohttp_client(create_app(make_config(tmp_path)))
        response = await client.get("/openapi.json")
        assert response.status == 200 and await response.json() == SPEC


@pytest.mark.docker
class TestRealAnswersConform:
    """Answers the app really gives validate against the schemas documented for them."""

    @pytest.fixture
    def agent_config(self, tmp_path: Path) -> Any:
        return make_config(tmp_path / "state", fake_gpus="RTX 4090:24")

    async def check(self, agent: Client, method: str, path: str, template: str,
                    body: Any = None) -> Any:
        response = await agent.request(method, path, json=body)
        answer = await response.json()
        validate(answer, schema=response_schema(template, method.lower(), response.status))
        return answer

    async def test_every_endpoint(self, agent: Client) -> None:
        await self.check(agent, "GET", "/health", "/health")
        await self.check(agent, "POST", "/deploy", "/deploy", {"name": "t-oa", "image": TEST_IMAGE})
        await self.check(agent, "POST", "/deploy", "/deploy", {"name": "t-oa", "image": TEST_IMAGE})
        await self.check(agent, "POST", "/deploy", "/deploy",
                         {"name": "t-oa-gpu", "image": TEST_IMAGE, "gpu": True, "vram_gb": 4})
        assert len(await self.check(agent, "GET", "/services", "/services")) == 2
        await self.check(agent, "GET", "/services/t-oa", "/services/{name}")
        gpus = await self.check(agent, "GET", "/gpus", "/gpus")
        assert gpus[0]["services"] == ["t-oa-gpu"]
        await self.check(agent, "POST", "/stop", "/stop", {"name": "t-oa"})

    async def test_error_answers(self, agent: Client) -> None:
        cases = [
            ("/deploy", {"name": "Bad", "image": ""}, 400),
            ("/deploy", {"name": "t-oa-mount", "image": TEST_IMAGE, "volumes": ["/etc:/e"]}, 403),
            ("/deploy", {"name": "t-oa-exit", "image": TEST_IMAGE, "command": "sh -c 'exit 5'"}, 502),
            ("/deploy", {"name": "t-oa-big", "image": TEST_IMAGE, "gpu": True, "vram_gb": 99}, 503),
            ("/deploy", {"name": "t-oa-slow", "image": TEST_IMAGE, "health": "/x",
                         "ready_timeout": 0.3}, 504),
            ("/stop", {"name": "t-oa-none"}, 404),
        ]
        for path, body, status in cases:
            response = await agent.post(path, json=body)
            assert response.status == status, await response.text()
            validate(await response.json(), schema=response_schema(path, "post", status))
        await deploy(agent, name="t-oa-c")
        response = await agent.post("/deploy", json={"name": "t-oa-c", "image": TEST_IMAGE, "port": 9})
        validate(await response.json(), schema=response_schema("/deploy", "post", 409))
        response = await agent.get("/services/t-oa-none")
        validate(await response.json(), schema=response_schema("/services/{name}", "get", 404))


# -- fuzzing: schemathesis against a real agent process ------------------------------------

FUZZ_TOKEN = "fuzz-token-5d1e"
FUZZ_CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
               "response_schema_conformance,negative_data_rejection")


def managed_containers() -> set[str]:
    return set(subprocess.run(["docker", "ps", "-aq", "--no-trunc", "--filter",
                               "label=tidybot.deploy-agent"],
                              capture_output=True, text=True, check=True).stdout.split())


def volumes() -> set[str]:
    return set(subprocess.run(["docker", "volume", "ls", "-q"], capture_output=True, text=True,
                              check=True).stdout.split())


@pytest.fixture
def fuzz_agent(tmp_path: Path, test_image: str) -> Iterator[AgentProcess]:
    """An agent with a token, an allowlist of the local test images only, a short ready cap.

    Fuzzed deploys create containers and volumes under arbitrary names, so everything that
    appeared while it ran is removed afterwards.
    """
    if not Path(installed("st")).exists():
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    remove_test_containers()
    containers_before, volumes_before = managed_containers(), volumes()
    agent = AgentProcess(tmp_path / "state", "--allow-image", "deploy-agent-test/*",
                         "--max-ready-timeout", "1", "--stop-timeout", "1")
    agent.start_env = {"DEPLOY_AGENT_TOKEN": FUZZ_TOKEN}
    agent.start()
    try:
        yield agent
    finally:
        agent.close()
        new = managed_containers() - containers_before
        if new:
            subprocess.run(["docker", "rm", "-f", *new], capture_output=True, check=True)
        for volume in volumes() - volumes_before:
            subprocess.run(["docker", "volume", "rm", volume], capture_output=True)


def run_schemathesis(schema: str, base_url: str, log: Path, examples: int) -> None:
    result = subprocess.run(
        [installed("st"), "--config-file", str(Path(__file__).with_name("schemathesis.toml")), "run", schema,
         "--url", base_url, "-H", f"Authorization: Bearer {FUZZ_TOKEN}",
         "-n", str(examples), "--checks", FUZZ_CHECKS, "--generation-deterministic",
         "--no-color"],
        capture_output=True, text=True, timeout=300,
    )
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-6000:]


@pytest.mark.docker
class TestFuzzing:
    """Bounded schemathesis runs: no 5xx, every answer as documented, bad input refused."""

    def test_shipped_schema(self, fuzz_agent: AgentProcess, tmp_path: Path) -> None:
        run_schemathesis(fuzz_agent.url + "/openapi.json", fuzz_agent.url,
                         tmp_path / "st-shipped.log", examples=30)
        assert get_json(fuzz_agent.url + "/health")["status"] == "ok"

    def test_deploys_reach_the_engine(self, fuzz_agent: AgentProcess, tmp_path: Path) -> None:
        """The same run with the image pinned to the test image, so fuzzed deploys go deep."""
        narrowed = json.loads(json.dumps(SPEC))
        schemas = narrowed["components"]["schemas"]
        schemas["FlatDeploy"]["properties"]["image"] = {"const": TEST_IMAGE}
        schemas["ManifestDeploy"]["properties"]["deploy"]["properties"]["image"] = {"const": TEST_IMAGE}
        schemas["FlatDeploy"]["properties"]["gpu"] = {"const": False}
        logs = narrowed["paths"]["/services/{name}/logs"]["get"]["parameters"]
        # Fuzzed names can match deployed services: no endless follow streams.
        next(p for p in logs if p["name"] == "follow")["schema"] = {"enum": ["0", "false"]}
        path = tmp_path / "narrowed.json"
        path.write_text(json.dumps(narrowed))
        run_schemathesis(str(path), fuzz_agent.url, tmp_path / "st-narrowed.log", examples=15)
        log = fuzz_agent.log.read_text()
        assert "Traceback" not in log, log[-4000:]
        assert "Deployed " in log or "failed or was cancelled" in log, log[-4000:]  # reached Docker
        status, _ = post_json(fuzz_agent.url + "/deploy", {"name": "t-after-fuzz", "image": TEST_IMAGE},
                              headers={"Authorization": f"Bearer {FUZZ_TOKEN}"})
        assert status == 200, fuzz_agent.log.read_text()[-4000:]
        remove_test_containers()
