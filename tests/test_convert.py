"""Tests for deploy_agent.convert: bodies to DeployRequest, and 400 details per bad field."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from deploy_agent.convert import make_converter, parse_deploy_request, parse_stop_request
from deploy_agent.errors import InvalidRequest
from deploy_agent.models import DeployRequest

VALID = {"name": "yolo-service", "image": "tidybot/yolo-service:0.2.0"}


def parse(body: Any) -> DeployRequest:
    return parse_deploy_request(make_converter(), body)


def bad_fields(body: Any) -> set[str]:
    with pytest.raises(InvalidRequest) as caught:
        parse(body)
    assert caught.value.status == 400
    return {d["field"] for d in caught.value.extra["details"]}


class TestFlatBody:
    """The flat body of the spec is parsed with the documented defaults."""

    def test_defaults(self) -> None:
        spec = parse(VALID).spec
        assert (int(spec.port), spec.gpu, float(spec.vram_gb), dict(spec.env), tuple(spec.volumes)) == (
            8000, False, 0, {}, ())
        assert (str(spec.health), float(spec.ready_timeout), spec.command) == ("/health", 60, None)

    def test_full_spec_example(self) -> None:
        body = {**VALID, "port": 8010, "gpu": True, "vram_gb": 8, "env": {"MODEL": "y.pt"},
                "volumes": ["models:/app/models"], "health": "/health", "ready_timeout": 120}
        spec = parse(body).spec
        assert spec.port == 8010 and spec.gpu is True and spec.vram_gb == 8.0
        assert spec.volumes == ("models:/app/models",)

    def test_env_values_are_stringified(self) -> None:
        env = parse({**VALID, "env": {"A": 1, "B": 2.5, "C": True, "D": False, "E": "x"}}).spec.env
        assert env == {"A": "1", "B": "2.5", "C": "true", "D": "false", "E": "x"}

    def test_command_string_is_split_like_a_shell(self) -> None:
        spec = parse({**VALID, "command": "python -m serve --name 'a b'"}).spec
        assert spec.command == ("python", "-m", "serve", "--name", "a b")

    def test_command_list_is_kept(self) -> None:
        assert parse({**VALID, "command": ["sh", "-c", "x y"]}).spec.command == ("sh", "-c", "x y")

    def test_replace_is_read(self) -> None:
        assert parse({**VALID, "replace": True}).replace is True
        assert parse(VALID).replace is False

    @pytest.mark.parametrize("image", [
        "busybox", "tidybot/yolo:0.2.0", "localhost:5000/team/img:tag",
        "registry.example.com/a/b/c@sha256:" + "a" * 64, "my_image:1.0-rc.1",
    ])
    def test_valid_image_references(self, image: str) -> None:
        assert parse({**VALID, "image": image}).spec.image == image


class TestNestedManifest:
    """The service.yaml form as JSON maps onto the flat fields; unknown keys are refused."""

    MANIFEST: ClassVar[dict[str, Any]] = {
        "name": "yolo-service", "version": "0.2.0", "description": "YOLO-E",
        "requires": {"gpu": True, "vram_gb": 8, "ram_gb": 4},
        "deploy": {"image": "tidybot/yolo-service:0.2.0", "port": 8010,
                   "env": {"MODEL": "yoloe-11l-seg.pt"}, "volumes": ["models:/app/models"],
                   "health": "/health", "ready_timeout": 120, "runtime": "nvidia"},
        "client": "client.py",
    }

    def test_manifest_maps_onto_flat_fields(self) -> None:
        spec = parse(self.MANIFEST).spec
        assert (spec.name, spec.image, spec.port, spec.gpu, spec.vram_gb) == (
            "yolo-service", "tidybot/yolo-service:0.2.0", 8010, True, 8.0)
        assert spec.env == {"MODEL": "yoloe-11l-seg.pt"} and float(spec.ready_timeout) == 120
        assert spec.version == "0.2.0"

    def test_manifest_equals_its_flat_form(self) -> None:
        flat = {"name": "yolo-service", "image": "tidybot/yolo-service:0.2.0", "port": 8010,
                "gpu": True, "vram_gb": 8, "env": {"MODEL": "yoloe-11l-seg.pt"},
                "volumes": ["models:/app/models"], "ready_timeout": 120}
        assert parse(self.MANIFEST).spec.differing_fields(parse(flat).spec) == []

    @pytest.mark.parametrize(("section", "key"), [
        ("requires", "vram_gbs"), ("deploy", "imagee"), (None, "depoly"),
    ])
    def test_unknown_manifest_key_is_named(self, section: str | None, key: str) -> None:
        body: dict[str, Any] = {**self.MANIFEST, "requires": dict(self.MANIFEST["requires"]),
                                "deploy": dict(self.MANIFEST["deploy"])}
        (body[section] if section else body)[key] = 1
        with pytest.raises(InvalidRequest) as caught:
            parse(body)
        assert key in str(caught.value.extra["details"])

    def test_bad_nested_value_names_the_manifest_path(self) -> None:
        body = {**self.MANIFEST, "deploy": {**self.MANIFEST["deploy"], "port": 0}}
        assert bad_fields(body) == {"deploy.port"}

    def test_deploy_without_image_is_refused(self) -> None:
        assert "deploy.image" in bad_fields({"name": "a", "deploy": {"port": 80}})


class TestInvalidBodies:
    """Every invalid request is a 400 whose details name each bad field."""

    @pytest.mark.parametrize(("patch", "field"), [
        ({"name": None}, "name"),
        ({"image": None}, "image"),
        ({"name": "Yolo"}, "name"),
        ({"name": "a/b"}, "name"),
        ({"name": ".."}, "name"),
        ({"name": "a b"}, "name"),
        ({"name": "a" * 64}, "name"),
        ({"name": "-a"}, "name"),
        ({"name": ""}, "name"),
        ({"name": "yolo\n"}, "name"),  # a regex's $ would let a final newline through
        ({"image": "img:1\n"}, "image"),
        ({"lease_s": 60, "lease_id": "abc\n"}, "lease_id"),
        ({"volumes": ["models\n:/m"]}, "volumes"),
        ({"health": "/health\n"}, "health"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"port": "8000"}, "port"),
        ({"port": 80.5}, "port"),
        ({"port": True}, "port"),
        ({"gpu": "true"}, "gpu"),
        ({"gpu": 1}, "gpu"),
        ({"vram_gb": -1}, "vram_gb"),
        ({"vram_gb": "8"}, "vram_gb"),
        ({"env": ["A=1"]}, "env"),
        ({"env": {"A": {"nested": 1}}}, "env"),
        ({"env": {"A": [1]}}, "env"),
        ({"env": {"A": None}}, "env"),
        ({"env": {"A=B": "1"}}, "env"),
        ({"volumes": "models:/app"}, "volumes"),
        ({"volumes": [1]}, "volumes"),
        ({"volumes": ["models"]}, "volumes"),
        ({"volumes": ["models:relative"]}, "volumes"),
        ({"volumes": ["models:/"]}, "volumes"),
        ({"volumes": ["models:/a:rx"]}, "volumes"),
        ({"health": "health"}, "health"),
        ({"health": ""}, "health"),
        ({"ready_timeout": 0}, "ready_timeout"),
        ({"ready_timeout": -5}, "ready_timeout"),
        ({"image": ""}, "image"),
        ({"image": "UPPER/case"}, "image"),
        ({"image": "bad image"}, "image"),
        ({"command": []}, "command"),
        ({"command": ["a", 1]}, "command"),
        ({"command": "unterminated 'quote"}, "command"),
        ({"replace": "yes"}, "replace"),
        ({"vram_gbs": 8}, "$"),
    ])
    def test_bad_field_is_named(self, patch: dict[str, Any], field: str) -> None:
        body = {**VALID, **patch}
        body = {k: v for k, v in body.items() if not (k in ("name", "image") and v is None)}
        assert field in bad_fields(body)

    @pytest.mark.parametrize("body", [[], "x", 1, None, [VALID]])
    def test_body_must_be_an_object(self, body: Any) -> None:
        assert bad_fields(body) == {"$"}

    def test_every_bad_field_is_reported_at_once(self) -> None:
        body = {"name": "Bad", "image": "", "port": 0, "gpu": "x", "vram_gb": -1}
        assert bad_fields(body) == {"name", "image", "port", "gpu", "vram_gb"}

    def test_unknown_key_message_names_it(self) -> None:
        with pytest.raises(InvalidRequest) as caught:
            parse({**VALID, "vram_gbs": 8})
        assert "vram_gbs" in caught.value.extra["details"][0]["message"]


class TestStopBody:
    """POST /stop takes exactly {"name": ...}."""

    def test_valid(self) -> None:
        assert parse_stop_request(make_converter(), {"name": "yolo"}) == "yolo"

    @pytest.mark.parametrize("body", [{}, {"name": "Bad"}, {"name": 1}, [], {"name": "a", "x": 1}])
    def test_invalid(self, body: Any) -> None:
        with pytest.raises(InvalidRequest):
            parse_stop_request(make_converter(), body)
