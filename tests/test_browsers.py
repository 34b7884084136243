"""A web page open in a browser on the node can't drive the agent: JSON bodies only, and
a Host that is a name must be one of the agent's own (DNS rebinding needs a name)."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver

from deploy_agent.browsers import host_of, is_ip_literal, own_host_names
from tests.agent_process import AgentProcess, AgentProcesses, get_json, post_json
from tests.browser import browser_available, chromium
from tests.conftest import TEST_IMAGE, make_config
from tests.test_api_docker import test_containers


class TestHostNames:
    """Which Host headers are the agent's own."""

    def test_names_and_literals(self, tmp_path: Path) -> None:
        config = make_config(tmp_path, advertise_host="gpu-1.lab", allow_host_headers=("Alias.Lab",))
        names = own_host_names(config, hostname="Node7")
        assert names == {"localhost", "node7", "node7.local", "gpu-1.lab", "alias.lab"}
        assert own_host_names(make_config(tmp_path, advertise_host="10.0.0.5"), "n") == {
            "localhost", "n", "n.local"}  # an address is no name to allow
        assert "gpu7.local" in own_host_names(config, hostname="gpu7.lab.example")  # as mDNS says

    def test_host_part(self) -> None:
        assert host_of("localhost:9000") == "localhost"
        assert host_of("[::1]:9000") == "::1" and is_ip_literal(host_of("[::1]:9000"))
        assert host_of("127.0.0.1") == "127.0.0.1" and is_ip_literal("127.0.0.1")
        assert not is_ip_literal("evil.test")


def call(agent: AgentProcess, path: str, host: str, method: str = "GET",
         body: bytes | None = None, content_type: str | None = None) -> tuple[int, Any]:
    """A raw request with a Host of the test's choosing (urllib would set its own)."""
    connection = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        headers = {"Host": host}
        if content_type is not None:
            headers["Content-Type"] = content_type
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


@pytest.mark.docker
class TestDoors:
    """On a default loopback agent: nothing a page can send without a preflight is done."""

    def test_a_body_not_declared_json_is_415_and_does_nothing(self, node: AgentProcess) -> None:
        body = json.dumps({"name": "t-page", "image": TEST_IMAGE}).encode()
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                             None):
            status, answer = call(node, "/deploy", f"127.0.0.1:{node.port}", "POST", body, content_type)
            assert (status, answer["error"]) == (415, "unsupported_media_type"), content_type
        status, _ = call(node, "/stop", "localhost", "POST", b'{"name": "t-page"}', "text/plain")
        assert status == 415
        for path in ("/deploy?dry_run=true", "/services/t-page/renew"):
            assert call(node, path, "localhost", "POST", body, "text/plain")[0] == 415, path
        assert call(node, "/deploy", "localhost", "POST", body, "application/jsonx")[0] == 415
        assert test_containers() == [] and get_json(node.url + "/services") == []
        status, answer = call(node, "/deploy?dry_run=true", "localhost", "POST", body,
                              "Application/JSON; charset=utf-8")  # parameters and case are fine
        assert status == 200, answer

    def test_the_disk_routes_have_the_same_doors(self, node: AgentProcess, pushed_image: str) -> None:
        """A page can't make the node pull (a simple POST) or remove a cache (a rebound name)."""
        body = json.dumps({"image": pushed_image}).encode()
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            status, answer = call(node, "/images/pull", "localhost", "POST", body, content_type)
            assert (status, answer["error"]) == (415, "unsupported_media_type"), content_type
        status, answer = call(node, "/images/pull", "evil.test", "POST", body, "application/json")
        assert (status, answer["error"]) == (403, "host_not_allowed")
        status, answer = call(node, "/caches/t-anything", "evil.test", "DELETE")
        assert (status, answer["error"]) == (403, "host_not_allowed")
        assert subprocess.run(["docker", "image", "inspect", pushed_image],
                              capture_output=True).returncode != 0  # never pulled

    def test_no_preflight_is_ever_allowed(self, node: AgentProcess) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
        try:
            connection.request("OPTIONS", "/deploy", headers={
                "Host": "localhost", "Origin": "http://evil.test",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type"})
            response = connection.getresponse()
            response.read()
        finally:
            connection.close()
        assert response.status >= 400
        assert not [h for h in response.headers if h.lower().startswith("access-control-")]

    def test_a_foreign_host_name_is_403(self, node: AgentProcess) -> None:
        for path in ("/health", "/services", "/"):
            status, answer = call(node, path, f"evil.test:{node.port}")
            assert (status, answer["error"]) == (403, "host_not_allowed"), path
        body = json.dumps({"name": "t-rebound", "image": TEST_IMAGE}).encode()
        status, _ = call(node, "/deploy", "evil.test", "POST", body, "application/json")
        assert status == 403 and test_containers() == []
        for host in (f"localhost:{node.port}", f"127.0.0.1:{node.port}", f"[::1]:{node.port}",
                     f"{os.uname().nodename}:{node.port}", "LOCALHOST."):
            assert call(node, "/health", host)[0] == 200, host

    def test_an_allowed_host_header_is_served(self, agent_processes: AgentProcesses) -> None:
        agent = agent_processes.start("--allow-host-header", "gpu-box.lab")
        assert call(agent, "/services", "gpu-box.lab:9000")[0] == 200
        assert call(agent, "/services", "other.lab")[0] == 403


@pytest.fixture
def attacker_site(tmp_path: Path) -> Iterator[str]:
    """A page of another origin on 127.0.0.1, served by a thread of the test."""
    site = tmp_path / "site"
    site.mkdir()
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(site))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.docker
@pytest.mark.skipif(not browser_available() and os.environ.get("CI") != "true",
                    reason="needs chromium and chromium-driver (.ci/run installs them)")
class TestInABrowser:
    """A real Chromium: a cross-site page and a rebound name get nothing; the page still works."""

    def test_a_cross_site_page_creates_nothing(self, node: AgentProcess, attacker_site: str,
                                               tmp_path: Path) -> None:
        body = json.dumps({"name": "t-cross-site", "image": TEST_IMAGE})
        (tmp_path / "site" / "index.html").write_text(f"""<!doctype html><script>
fetch("{node.url}/deploy", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}},
      body: {json.dumps(body)}}})
  .then(() => {{ document.title = "answered"; }}, () => {{ document.title = "unreachable"; }});
</script>""")
        driver = chromium(tmp_path / "chromium")
        try:
            driver.get(attacker_site + "/index.html")
            deadline = time.monotonic() + 15
            while driver.title not in ("answered", "unreachable"):
                assert time.monotonic() < deadline, "the page's request never finished"
                time.sleep(0.1)
            assert driver.title == "answered"  # it reached the agent, which did nothing
        finally:
            driver.quit()
        time.sleep(1)
        assert test_containers() == [] and get_json(node.url + "/services") == []

    def test_a_rebound_name_is_refused_and_the_page_still_works(self, node: AgentProcess,
                                                                tmp_path: Path) -> None:
        driver: webdriver.Chrome = chromium(tmp_path / "chromium",
                                            flags=("--host-resolver-rules=MAP evil.test 127.0.0.1",))
        try:
            driver.get(f"http://evil.test:{node.port}/services")  # DNS rebinding, as the browser sees it
            assert "host_not_allowed" in driver.page_source
            driver.get(f"http://localhost:{node.port}/")
            assert "host_not_allowed" not in driver.page_source
            deadline = time.monotonic() + 15
            while " · deploy-agent" not in driver.title:  # the page's own requests came back
                assert time.monotonic() < deadline, driver.title
                time.sleep(0.1)
        finally:
            driver.quit()


@pytest.mark.docker
def test_post_json_still_deploys(node: AgentProcess) -> None:
    """The agent's own callers send JSON: they keep working."""
    status, answer = post_json(node.url + "/deploy", {"name": "t-json", "image": TEST_IMAGE})
    assert status == 200, answer
    assert post_json(node.url + "/stop", {"name": "t-json"})[0] == 200
