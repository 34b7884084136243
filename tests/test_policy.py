"""Tests for deploy_agent.policy: which host paths a service may mount."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from deploy_agent.errors import ImageNotAllowed, MountNotAllowed
from deploy_agent.policy import check_image, check_mounts, host_path_refusal
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

    @pytest.mark.parametrize("allowed_root", ["/", "/var", "/etc"])
    def test_allowing_a_system_path_still_refuses_it(self, allowed_root: str) -> None:
        config = attrs.evolve(self.config, allow_host_paths=(Path(allowed_root),))
        for source in ("/", "/var", "/var/lib/docker/x", "/etc/ssl"):
            assert host_path_refusal(source, config) is not None

    def test_symlink_out_of_an_allowed_root_is_refused(self, tmp_path: Path) -> None:
        (tmp_path / "models").mkdir()
        (tmp_path / "models" / "escape").symlink_to("/etc")
        (tmp_path / "models" / "real").mkdir()
        config = attrs.evolve(self.config, allow_host_paths=(tmp_path / "models",))
        assert "system path" in (host_path_refusal(str(tmp_path / "models" / "escape"), config) or "")
        assert host_path_refusal(str(tmp_path / "models" / "real"), config) is None

    def test_no_roots_means_no_host_paths(self) -> None:
        config = attrs.evolve(self.config, allow_host_paths=())
        with pytest.raises(MountNotAllowed):
            check_mounts(spec(volumes=("/srv/models:/m",)), config)


class TestImageAllowlist:
    """--allow-image globs match the full reference; without any, every image is allowed."""

    def test_no_patterns_allow_all(self) -> None:
        check_image("anything/at:all", make_config(Path("/tmp")))

    @pytest.mark.parametrize(("image", "allowed"), [
        ("registry.lab:5000/vision/yolo:1", True), ("registry.lab:5000/x", True),
        ("docker.io/library/busybox", False), ("registry.lab:5001/yolo:1", False),
        ("tidybot/yolo:0.2.0", True), ("tidybot/yolo:latest", False),
    ])
    def test_patterns(self, image: str, allowed: bool) -> None:
        config = make_config(Path("/tmp"), allow_images=("registry.lab:5000/*", "tidybot/yolo:0.*"))
        if allowed:
            check_image(image, config)
        else:
            with pytest.raises(ImageNotAllowed) as caught:
                check_image(image, config)
            assert caught.value.status == 403 and caught.value.code == "image_not_allowed"
