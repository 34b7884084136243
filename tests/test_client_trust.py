"""A client skill agents can trust (#22): leases that never undo a stop, one copy across
nodes, a sync client safe anywhere, typed answers. Real agents where a deploy runs; the
stand-ins of tests/standins.py where a failure needs a node that misbehaves."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import attrs
import pytest

from deploy_agent.client import (
    AgentClient,
    AsyncAgentClient,
    AsyncComputeNodes,
    ComputeNodes,
    Lease,
    LeaseLost,
    NodeUncertain,
    NodeUnreachable,
    Service,
)
from deploy_agent.gpus import GpuView
from deploy_agent.models import ServiceView
from tests.agent_process import AgentProcess, free_port, post_json
from tests.conftest import TEST_IMAGE
from tests.standins import SilentProxy, StandInNode, listed, stand_in_node
from tests.test_visible_deploys import wait_for


@pytest.fixture
def stand_in() -> Iterator[StandInNode]:
    with stand_in_node() as node:
        yield node


def body(name: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "image": TEST_IMAGE, **more}


# -- leases against a real agent -----------------------------------------------------------


@pytest.mark.docker
class TestLeasesNeverUndoAStop:
    """An operator's stop ends the holder's lease: the service stays stopped, and the holder
    learns why, while inside (lost, a callback) and on leaving (LeaseLost)."""

    def test_sync_holder_learns_and_does_not_redeploy(self, node: AgentProcess) -> None:
        told: list[Lease] = []
        with AgentClient(node.url) as client:
            with pytest.raises(LeaseLost) as caught, \
                    client.leased(body("t-held"), lease_s=1.5, on_lost=told.append) as lease:
                assert post_json(node.url + "/stop", {"name": "t-held"})[0] == 200
                wait_for(lambda: lease.lost, timeout=5)
                time.sleep(1.5)  # three renewal periods: none may bring it back
                assert "t-held" not in node.services()
                assert lease.error is not None and lease.error.reason == "request"
            assert caught.value.reason == "request" and caught.value.event is not None
            assert caught.value.event["kind"] == "stopped"
            assert "stopped" in str(caught.value) and "not brought back" in str(caught.value)
            wait_for(lambda: told, timeout=5)
            assert told == [lease]
        assert "t-held" not in node.services()

    async def test_async_holder_the_same(self, node: AgentProcess) -> None:
        told: list[str] = []

        async def on_lost(lease: Lease) -> None:
            told.append(lease.name)

        async with AsyncAgentClient(node.url) as client:
            with pytest.raises(LeaseLost) as caught:
                async with client.leased(body("t-aheld"), lease_s=1.5, on_lost=on_lost) as lease:
                    await client.stop("t-aheld")
                    for _ in range(100):
                        if lease.lost:
                            break
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(1.5)
            assert caught.value.reason == "request" and told == ["t-aheld"]
        assert "t-aheld" not in node.services()

    def test_retake_is_explicit_and_the_holder_sees_the_new_lease(self, node: AgentProcess) -> None:
        """The node drops a lease while the service runs for someone else (pinned here):
        without retake that ends the holder's lease; with it, a new one, seen in place."""
        assert post_json(node.url + "/deploy", body("t-retake"))[0] == 200  # pinned
        with AgentClient(node.url) as client:
            with pytest.raises(LeaseLost) as caught, client.leased(body("t-retake"), lease_s=3) as lease:
                client.release("t-retake", lease.lease_id)
                wait_for(lambda: lease.lost, timeout=5)
            assert caught.value.reason == "lease_not_found"
            retaken: list[str] = []
            with client.leased(body("t-retake"), lease_s=3, retake=True,
                               on_retake=lambda held: retaken.append(held.lease_id)) as lease:
                first = lease.lease_id
                client.release("t-retake", first)
                wait_for(lambda: lease.retakes == 1, timeout=5)
                assert lease.lease_id != first and retaken == [lease.lease_id] and not lease.lost
                assert client.service("t-retake").leases == 1
            assert client.service("t-retake").leases == 0  # released on the way out
            client.stop("t-retake")

    def test_ctrl_c_releases(self, node: AgentProcess) -> None:
        script = ("import sys, time\nfrom deploy_agent.client import AgentClient\n"
                  f"with AgentClient({node.url!r}).leased({body('t-sigint', keep_warm_s=0)!r}, "
                  "lease_s=60) as lease:\n"
                  "    print(lease.lease_id, flush=True)\n    time.sleep(120)\n")
        holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip()
            assert node.services()["t-sigint"]["leases"] == 1
            holder.send_signal(signal.SIGINT)
            holder.wait(timeout=10)
        finally:
            holder.kill()
        assert "t-sigint" not in node.services()  # its only lease released: stopped at once

    def test_nodes_wide_lease(self, node: AgentProcess) -> None:
        with ComputeNodes([f"http://127.0.0.1:{free_port()}", node.url]) as nodes:
            with nodes.leased(body("t-nodes-lease", keep_warm_s=0), lease_s=3) as lease:
                assert (lease.node, lease.lease_id is not None) == (node.url, True)
                time.sleep(4)  # longer than the lease: only renewals keep it
                located = nodes.locate("t-nodes-lease")
                assert located is not None and located[0] == node.url and located[1].leases == 1
            assert nodes.locate("t-nodes-lease") is None


# -- leases against stand-ins: renewals that hang, fail, or answer nonsense -------------------


class TestRenewals:
    def test_a_hung_renewal_is_bounded_retried_and_exit_is_prompt(self, stand_in: StandInNode) -> None:
        with AgentClient(stand_in.url) as client:
            with client.leased(body("t-hang"), lease_s=3) as lease:
                stand_in.renew = "hang"
                wait_for(lambda: lease.trouble is not None, timeout=4)  # bounded well inside 3 s
                assert isinstance(lease.trouble, NodeUnreachable) and not lease.lost
                stand_in.renew = "ok"
                wait_for(lambda: lease.trouble is None, timeout=3)  # retried, not a whole period later
                stand_in.renew = "hang"
                time.sleep(1.2)  # a renewal is hanging now
                started = time.monotonic()
            assert time.monotonic() - started < 3  # left at once, releasing
        assert stand_in.called("DELETE", "/services/t-hang/leases/") == 1

    def test_renewals_that_never_get_through_end_the_lease(self, stand_in: StandInNode) -> None:
        """Twice its length without a word from the node; leaving still tries the release."""
        with AgentClient(stand_in.url) as client, pytest.raises(LeaseLost) as caught, \
                client.leased(body("t-out"), lease_s=1.5) as lease:
            stand_in.renew = "hang"
            started = time.monotonic()
            wait_for(lambda: lease.lost, timeout=8)
            assert time.monotonic() - started > 1.5  # not at its first missed renewal
            stand_in.renew = "ok"
        assert caught.value.reason == "unreachable" and "ran out" in str(caught.value)
        assert stand_in.called("DELETE", "/services/t-out/leases/") == 1

    def test_a_node_restarting_longer_than_the_lease_is_not_a_lost_lease(
            self, stand_in: StandInNode) -> None:
        """The node answers 503 starting_up for more than the lease: it gives restored leases
        a full lease_s, so the holder keeps renewing instead of calling it lost."""
        with AgentClient(stand_in.url) as client, client.leased(body("t-restarting"), lease_s=1) as lease:
            stand_in.starting = True
            wait_for(lambda: lease.trouble is not None, timeout=3)
            time.sleep(1.2)
            stand_in.starting = False
            wait_for(lambda: lease.trouble is None, timeout=3)
            assert not lease.lost

    def test_a_renewer_that_fails_never_dies_silently(self, stand_in: StandInNode) -> None:
        stand_in.renew = "garbage"
        async def hold() -> None:
            async with AsyncAgentClient(stand_in.url) as client, \
                    client.leased(body("t-bad"), lease_s=1) as lease:
                for _ in range(60):
                    if lease.lost:
                        break
                    await asyncio.sleep(0.05)
                assert lease.lost
        with pytest.raises(LeaseLost) as caught:
            asyncio.run(hold())
        assert caught.value.reason == "renew_failed" and isinstance(caught.value.__cause__, AttributeError)

    def test_gone_is_only_retaken_when_its_own_lease_ran_out(self, stand_in: StandInNode) -> None:
        stand_in.renew = "gone"
        stand_in.events = [{"id": 1, "time": "2026-12-06T00:00:00Z", "service": "t-gone", "kind": "stopped",
                            "reason": "vram_overuse", "details": {}}]
        with AgentClient(stand_in.url) as client:
            with pytest.raises(LeaseLost) as caught, \
                    client.leased(body("t-gone"), lease_s=1, retake=True) as lease:
                wait_for(lambda: lease.lost, timeout=5)
            assert caught.value.reason == "vram_overuse"
            assert stand_in.called("POST", "/deploy") == 1  # never deployed again
            stand_in.events[0]["reason"] = "lease_expired"  # it ran out while we were away
            with client.leased(body("t-gone"), lease_s=1, retake=True) as lease:
                wait_for(lambda: lease.retakes >= 1, timeout=5)
                assert lease.lease_id.startswith("lease-")
            assert stand_in.called("POST", "/deploy") >= 3

    @pytest.mark.docker
    @pytest.mark.parametrize("keep_warm_s", [0, 30])
    def test_a_silent_node_then_back(self, node: AgentProcess, keep_warm_s: float) -> None:
        """Through a proxy that goes silent longer than the lease: with retake, once the node
        is back, a new lease on the service, kept warm meanwhile or deployed again (the agent
        stopped it when the old lease ran out), at its current address."""
        proxy = SilentProxy(node.port)
        try:
            with AgentClient(proxy.url) as client, \
                    client.leased(body("t-away", keep_warm_s=keep_warm_s), lease_s=1.5,
                                  retake=True) as lease:
                proxy.go_silent()
                if keep_warm_s:
                    wait_for(lambda: node.services()["t-away"]["hold"] == "idle", timeout=10)
                else:
                    wait_for(lambda: "t-away" not in node.services(), timeout=10)
                proxy.go_silent(False)
                wait_for(lambda: lease.retakes == 1, timeout=10)
                entry = node.services()["t-away"]
                assert (entry["port"], entry["hold"]) == (lease.port, "leased") and not lease.lost
        finally:
            proxy.close()


# -- one copy across nodes: slow, starting and odd nodes -------------------------------------


class TestLocating:
    def test_a_node_slower_than_the_probe_is_waited_for(self) -> None:
        with stand_in_node() as slow, stand_in_node() as empty:
            slow.listing, slow.delay_s = [listed("t-slow")], 2.5
            placed = AsyncComputeNodes([empty.url, slow.url], probe_timeout=1, locate_timeout=10)
            answer = asyncio.run(_ensure(placed, body("t-slow")))
            assert answer["node"] == slow.url
            assert empty.called("POST", "/deploy") == 0 and slow.called("POST", "/deploy") == 1

    def test_a_starting_node_may_have_it(self) -> None:
        with stand_in_node() as starting, stand_in_node() as empty:
            starting.starting = True
            nodes = AsyncComputeNodes([empty.url, starting.url], locate_timeout=1.5)
            with pytest.raises(NodeUncertain) as caught:
                asyncio.run(_ensure(nodes, body("t-restart")))
            assert starting.url in str(caught.value) and "starting" in str(caught.value)
            assert empty.called("POST", "/deploy") == 0
            starting.listing = [listed("t-restart")]
            threading.Timer(1.0, lambda: setattr(starting, "starting", False)).start()
            nodes = AsyncComputeNodes([empty.url, starting.url], locate_timeout=10)
            assert asyncio.run(_ensure(nodes, body("t-restart")))["node"] == starting.url
            assert empty.called("POST", "/deploy") == 0

    def test_down_and_foreign_nodes_are_skipped(self, raw_http: str) -> None:
        with stand_in_node() as empty:
            nodes = AsyncComputeNodes([f"http://127.0.0.1:{free_port()}", raw_http, empty.url],
                                      locate_timeout=30)
            started = time.monotonic()
            assert asyncio.run(_ensure(nodes, body("t-skip")))["node"] == empty.url
            assert time.monotonic() - started < 15  # skipped, not waited for until locate_timeout


@pytest.fixture
def raw_http() -> Iterator[str]:
    """Something on a port that speaks HTTP but is no agent (a web server's error page)."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        for _ in range(10):
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 5\r\n"
                                   b"Connection: close\r\n\r\nhello")
    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


async def _ensure(nodes: AsyncComputeNodes, manifest: dict[str, Any]) -> dict[str, Any]:
    async with nodes:
        return await nodes.ensure(manifest)


# -- the sync client anywhere, typed answers ---------------------------------------------------


class TestSyncClient:
    def test_shared_by_threads(self, stand_in: StandInNode) -> None:
        client, failures = AgentClient(stand_in.url), []

        def calls() -> None:
            for _ in range(8):
                try:
                    client.health()
                except Exception as err:
                    failures.append(err)
        threads = [threading.Thread(target=calls) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        client.close()
        assert failures == [] and stand_in.called("GET", "/health") == 32

    def test_inside_a_running_loop(self, stand_in: StandInNode) -> None:
        async def notebook_cell() -> dict[str, Any]:
            with AgentClient(stand_in.url) as client:
                return client.health()
        assert asyncio.run(notebook_cell())["ok"] is True

    def test_per_call_timeout(self, stand_in: StandInNode) -> None:
        stand_in.delay_s = 6
        with AgentClient(stand_in.url) as client:
            started = time.monotonic()
            with pytest.raises(NodeUnreachable) as caught:
                client.health(timeout=0.3)
            assert time.monotonic() - started < 4 and caught.value.connected  # not the node's 6 s

    def test_scheme_less_url(self, stand_in: StandInNode) -> None:
        with AgentClient(stand_in.url.removeprefix("http://")) as client:
            assert client.url == stand_in.url and client.health()["ok"] is True
        with pytest.raises(ValueError, match="http://HOST:PORT"):
            AgentClient("ftp://somewhere")

    def test_from_env_takes_every_knob(self, monkeypatch: pytest.MonkeyPatch, stand_in: StandInNode) -> None:
        monkeypatch.setenv("COMPUTE_NODES", stand_in.url)
        nodes = AsyncComputeNodes.from_env(probe_timeout=0.5, locate_timeout=3, stall_timeout=9, timeout=7)
        assert (nodes.probe_timeout, nodes.locate_timeout) == (0.5, 3)
        assert (nodes.clients[0].stall_timeout, nodes.clients[0].timeout) == (9, 7)
        with ComputeNodes.from_env(locate_timeout=3) as synced:
            assert synced.urls == [stand_in.url] and synced.find("t-none") is None


@pytest.mark.docker
class TestSyncClientOnAnAgent:
    def test_calls_inside_follow_events(self, node: AgentProcess) -> None:
        assert post_json(node.url + "/deploy", body("t-follow"))[0] == 200
        with AgentClient(node.url) as client:
            for event in client.follow_events(since=0):
                assert event.kind == "deployed" and event.service == "t-follow"
                assert [s.name for s in client.services()] == ["t-follow"]
                break
            client.stop("t-follow")

    def test_nodes_parity(self, node: AgentProcess) -> None:
        with ComputeNodes([node.url]) as nodes:
            answer = nodes.ensure(body("t-parity", keep_warm_s=0), lease_s=30)
            assert nodes.renew("t-parity", answer["lease_id"])["node"] == node.url
            assert [e.kind for e in nodes.events() if e.service == "t-parity"] == ["deployed"]
            assert "listening" in nodes.logs("t-parity")
            assert nodes.release("t-parity", answer["lease_id"])["stopped"] is True


class TestTypedAnswers:
    def test_attributes_and_the_old_dict_reading(self) -> None:
        service = Service.of({"name": "a", "host": "http://h:1", "port": 1, "status": "healthy",
                              "brand_new": 1}, node="http://n:9000")
        assert (service.name, service.port, service.node, service.gpu) == ("a", 1, "http://n:9000", None)
        assert service.raw["brand_new"] == 1
        with pytest.warns(DeprecationWarning, match=r"read \.port"):
            assert service["port"] == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert dict(service.raw)["name"] == "a" and "port" in service and len(service) == 6

    def test_every_field_the_agent_sends_is_an_attribute(self) -> None:
        from deploy_agent.client import Gpu

        assert {f.name for f in attrs.fields(ServiceView)} <= {f.name for f in attrs.fields(Service)}
        assert {f.name for f in attrs.fields(GpuView)} <= {f.name for f in attrs.fields(Gpu)}




# -- what an attacker and a fault injector found (#22 review), each as a test ---------------------


class TestSyncClientFaults:
    def test_close_from_another_thread_ends_a_call_under_way(self, stand_in: StandInNode) -> None:
        stand_in.delay_s = 10
        client, outcome = AgentClient(stand_in.url), []

        def call() -> None:
            try:
                client.health()
            except BaseException as err:
                outcome.append(err)
        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.3)
        started = time.monotonic()
        client.close()
        caller.join(5)
        assert not caller.is_alive() and outcome and time.monotonic() - started < 5

    def test_a_callback_that_exits_does_not_kill_the_client(self, stand_in: StandInNode) -> None:
        def leave(lease: Lease) -> None:
            raise SystemExit(3)
        stand_in.renew = "gone"
        with AgentClient(stand_in.url) as client:
            with pytest.raises(LeaseLost), client.leased(body("t-exit"), lease_s=0.6, on_lost=leave) as lease:
                wait_for(lambda: lease.lost, timeout=5)
                time.sleep(0.3)  # the callback has run
            assert client.health()["ok"] is True

    def test_a_collected_or_closed_client_keeps_its_lease_renewed(self, stand_in: StandInNode) -> None:
        import gc

        with AgentClient(stand_in.url).leased(body("t-gc"), lease_s=0.6) as lease:
            gc.collect()
            before = stand_in.called("POST", "/services/t-gc/renew")
            time.sleep(1.0)
            assert stand_in.called("POST", "/services/t-gc/renew") > before and not lease.lost
        assert stand_in.called("DELETE", "/services/t-gc/leases/") == 1
        client = AgentClient(stand_in.url)
        with client.leased(body("t-closed"), lease_s=0.6):
            threading.Thread(target=client.close).start()
            before = stand_in.called("POST", "/services/t-closed/renew")
            time.sleep(1.0)
            assert stand_in.called("POST", "/services/t-closed/renew") > before
        assert stand_in.called("DELETE", "/services/t-closed/leases/") == 1


class TestPlacementFaults:
    def test_racing_ensures_agree_on_one_node(self) -> None:
        """Callers a few ms apart on nodes that list a first deploy from its first moment."""
        async def race(stagger: float) -> set[str]:
            with stand_in_node() as a, stand_in_node() as b:
                a.deploy_s = b.deploy_s = 0.5
                first, second = AsyncComputeNodes([a.url, b.url]), AsyncComputeNodes([a.url, b.url])

                async def late() -> dict[str, Any]:
                    await asyncio.sleep(stagger)
                    return await second.ensure(body("t-race"))
                answers = await asyncio.gather(first.ensure(body("t-race")), late())
                await first.close()
                await second.close()
                return {answer["node"] for answer in answers}
        assert all(len(asyncio.run(race((i % 8) * 0.002))) == 1 for i in range(16))

    @pytest.mark.parametrize("status", ["restarting", "exited"])
    def test_a_service_in_any_status_is_redeployed_where_it_is(self, status: str) -> None:
        with stand_in_node() as there, stand_in_node() as empty:
            there.listing = [listed("t-where", status)]
            nodes = AsyncComputeNodes([empty.url, there.url])
            assert asyncio.run(_ensure(nodes, body("t-where")))["node"] == there.url
            assert empty.called("POST", "/deploy") == 0

    def test_a_node_refusing_for_a_moment_is_waited_for(self) -> None:
        port = free_port()
        with stand_in_node() as empty:
            later: list[StandInNode] = []

            def come_back() -> None:
                node = StandInNode(port)
                node.listing = [listed("t-back")]
                later.append(node)
            threading.Timer(1.0, come_back).start()
            try:
                nodes = AsyncComputeNodes([empty.url, f"http://127.0.0.1:{port}"], down_after=4)
                assert asyncio.run(_ensure(nodes, body("t-back")))["node"] == f"http://127.0.0.1:{port}"
                assert empty.called("POST", "/deploy") == 0
            finally:
                wait_for(lambda: later, timeout=5)
                later[0].close()

    def test_foreign_protocols_are_skipped(self, raw_http: str) -> None:
        import socket

        def serving(reply: bytes) -> socket.socket:
            server = socket.socket()
            server.bind(("127.0.0.1", 0))
            server.listen()

            def serve() -> None:
                for _ in range(20):
                    try:
                        connection, _ = server.accept()
                    except OSError:
                        return
                    with connection:
                        connection.sendall(reply)
                        connection.recv(65536)
            threading.Thread(target=serve, daemon=True).start()
            return server
        ssh = serving(b"SSH-2.0-OpenSSH_9.6\r\n")
        garbled = serving(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4\r\n"
                          b"Connection: close\r\n\r\n\xff\xfe[]")
        try:
            with stand_in_node() as good:
                urls = [f"http://127.0.0.1:{s.getsockname()[1]}" for s in (ssh, garbled)]
                nodes = AsyncComputeNodes([*urls, good.url], locate_timeout=30)
                started = time.monotonic()
                assert asyncio.run(_ensure(nodes, body("t-odd")))["node"] == good.url
                assert time.monotonic() - started < 15  # skipped, not waited for until locate_timeout
                statuses = asyncio.run(AsyncComputeNodes([*urls, good.url]).status())
                assert [s["reachable"] for s in statuses] == [False, False, True]
        finally:
            ssh.close()
            garbled.close()

    def test_mdns_adverts_of_loopback_are_dropped(self, stand_in: StandInNode) -> None:
        with pytest.raises(ValueError, match="no compute nodes"):
            AsyncComputeNodes([stand_in.url], discovered=True)


@pytest.mark.docker
class TestLeaseFaultsOnAnAgent:
    def test_leaving_right_after_an_operator_stop_says_so(self, node: AgentProcess) -> None:
        with AgentClient(node.url) as client:
            with pytest.raises(LeaseLost) as caught, client.leased(body("t-quick-stop"), lease_s=60):
                assert post_json(node.url + "/stop", {"name": "t-quick-stop"})[0] == 200
            assert caught.value.reason == "request"

    async def test_a_lease_left_half_way_is_released(self, node: AgentProcess) -> None:
        """Cancelled while the deploy runs (Ctrl-C in a sync holder): the lease the node
        announced is let go of, so the service isn't kept for a holder that is gone."""
        async with AsyncAgentClient(node.url) as client:
            entering = asyncio.ensure_future(
                client.leased(body("t-half", env={"DELAY": "3"}, keep_warm_s=0), lease_s=60).__aenter__())
            for _ in range(200):
                if node.services().get("t-half", {}).get("status") == "starting":
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            entering.cancel()
            await asyncio.gather(entering, return_exceptions=True)
            for _ in range(300):  # the deploy finishes at the node, held by no one: stopped
                if "t-half" not in node.services():
                    break
                await asyncio.sleep(0.05)
            assert "t-half" not in node.services()
