"""Tests for deploy_agent.policy: which host paths a service may mount."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from deploy_agent.errors import MountNotAllowed
from deploy_agent.policy import check_mounts
from tests.conftest import make_config
from tests.test_models import spec


class TestMounts:
    """Named volumes pass; host paths only under an allowed root and never system paths."""

    config = make_config(Path("/tmp/unused"), allow_host_paths=(Path("/srv/models"),))

    def test_named_volume_is_allowed(self) -> None:
        check_mounts(spec(volumes=("models:/app/models",)), self.config)

    def test_path_under_allowed_root(self) -> None:
        check_mounts(spec(volumes=("/srv/models/yolo:/m:ro",)), self.config)

    @pytest.mark.parametrize("source", [
        "/", "/etc", "/etc/passwd", "/proc", "/sys/kernel", "/dev", "/boot", "/root",
        "/var/lib/docker", "/var/run/docker.sock", "/srv/models/../../etc", "/home/user",
        "/srv/modelsX",
    ])
    def test_refused(self, source: str) -> None:
        with pytest.raises(MountNotAllowed) as caught:
            check_mounts(spec(volumes=(f"{source}:/data",)), self.config)
        assert caught.value.status == 403

    def test_no_roots_means_no_host_paths(self) -> None:
        config = attrs.evolve(self.config, allow_host_paths=())
        with pytest.raises(MountNotAllowed):
            check_mounts(spec(volumes=("/srv/models:/m",)), config)
