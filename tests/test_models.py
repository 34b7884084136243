"""Tests for deploy_agent.models: answer shapes and spec comparison."""

from __future__ import annotations

from typing import Any

import attrs

from deploy_agent.cli import lease_command
from deploy_agent.convert import LEASE_ID_RE, make_converter
from deploy_agent.models import (
    DeployAnswer,
    DeploySpec,
    Lease,
    Service,
    ServiceView,
    new_lease_id,
    parse_duration,
    service_url,
)


def spec(**changes: Any) -> DeploySpec:
    base = make_converter().structure({"name": "yolo", "image": "img:1"}, DeploySpec)
    return attrs.evolve(base, **changes)


class TestLeaseIds:
    """An agent's lease ids can be typed on a command line: CI once drew one starting with '-',
    and `deployctl renew NAME -7mw...` took it for an option (1 in 64 ids did)."""

    def test_never_a_leading_dash(self) -> None:
        drawn = [new_lease_id() for _ in range(5000)]  # (63/64)**5000: no leading '-' by chance
        assert not [i for i in drawn if i.startswith("-")]
        assert all(LEASE_ID_RE.fullmatch(i) and len(i) == 16 for i in drawn)
        assert len(set(drawn)) == len(drawn)

    def test_an_older_dashed_id_is_printed_after_double_dash(self) -> None:
        assert lease_command("renew", "yolo", "-chosen") == "deployctl renew yolo -- -chosen"
        assert lease_command("release", "yolo", "abc-1") == "deployctl release yolo abc-1"


class TestServiceView:
    """A /services entry carries the spec's fields plus the live ones."""

    def test_shape(self) -> None:
        service = Service(spec=spec(port=8010), container_id="abc", host_port=8011, gpu=0,
                          status="healthy", started_at=1000.0)
        leases = [Lease("a", "yolo", 60, 5000.25), Lease("b", "yolo", 60, 7000.5)]
        view = make_converter().unstructure(ServiceView.of(service, "10.0.0.5", now=4600.9,
                                                           leases=leases))
        assert view["host"] == "http://10.0.0.5:8011"
        assert (view["port"], view["container_port"], view["uptime"]) == (8011, 8010, 3600)
        assert {"name", "host", "port", "gpu", "status", "uptime", "image"} <= set(view)
        assert (view["leases"], view["lease_expires_at"]) == (2, "1970-01-01T01:56:40.500Z")

    def test_env_values_never_appear(self) -> None:
        service = Service(spec=spec(env={"API_KEY": "s3cret"}), container_id="a", host_port=1)
        assert "s3cret" not in str(make_converter().unstructure(ServiceView.of(service, "h", 0, [])))

    def test_without_leases_the_expiry_is_null(self) -> None:
        service = Service(spec=spec(), container_id="a", host_port=1)
        view = make_converter().unstructure(ServiceView.of(service, "h", 0, []))
        assert (view["leases"], view["lease_expires_at"]) == (0, None)

    def test_ipv6_advertise_host_is_bracketed(self) -> None:
        assert service_url("fe80::1", 8000) == "http://[fe80::1]:8000"


class TestDeployAnswer:
    """The deploy answer has the spec's fields."""

    def test_shape(self) -> None:
        answer = make_converter().unstructure(
            DeployAnswer(name="a", host="http://h:1", port=1, gpu=None, status="healthy",
                         already_running=False))
        assert set(answer) == {"ok", "name", "host", "port", "gpu", "status", "already_running"}
        assert answer["ok"] is True


class TestDifferingFields:
    """Only fields that change what runs make a redeploy a conflict."""

    def test_same_spec(self) -> None:
        assert spec().differing_fields(spec()) == []

    def test_runtime_fields_differ(self) -> None:
        assert spec(port=1, env={"A": "1"}).differing_fields(spec()) == ["port", "env"]

    def test_ready_timeout_and_metadata_do_not(self) -> None:
        assert spec(ready_timeout=5.0, version="2").differing_fields(spec()) == []


class TestDurations:
    """Lease lengths read as people write them."""

    def test_units(self) -> None:
        assert [parse_duration(t) for t in ("90", "90s", "10m", "2h", "1d", "1.5h")] == [
            90, 90, 600, 7200, 86400, 5400]

    def test_refused(self) -> None:
        import pytest

        for bad in ("", "0", "-5m", "forever", "nan", "inf", "10x"):
            with pytest.raises(ValueError):
                parse_duration(bad)
