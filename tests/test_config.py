"""Tests for deploy_agent.config: flags, env fallbacks, defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy_agent.config import parse_config


class TestParseConfig:
    """Flags win over DEPLOY_AGENT_* variables, which win over defaults."""

    def test_defaults(self) -> None:
        config = parse_config([], {})
        assert (config.host, config.port, config.port_range) == ("0.0.0.0", 9000, (8000, 8999))
        assert config.docker_host == "unix:///var/run/docker.sock"
        assert config.advertise_host  # detected, never empty

    def test_env_fallbacks(self) -> None:
        config = parse_config([], {
            "DEPLOY_AGENT_PORT": "9100", "DEPLOY_AGENT_HOST": "127.0.0.1",
            "DEPLOY_AGENT_PORT_RANGE": "100-200", "DEPLOY_AGENT_ADVERTISE_HOST": "gpu-1",
            "DEPLOY_AGENT_STATE_DIR": "/srv/s", "DEPLOY_AGENT_LOG_LEVEL": "debug",
            "DEPLOY_AGENT_DOCKER_HOST": "unix:///x.sock", "DEPLOY_AGENT_ALLOW_HOST_PATH": "/a:/b",
        })
        assert (config.port, config.host, config.port_range) == (9100, "127.0.0.1", (100, 200))
        assert (config.advertise_host, config.state_dir) == ("gpu-1", Path("/srv/s"))
        assert (config.log_level, config.docker_host) == ("DEBUG", "unix:///x.sock")
        assert config.allow_host_paths == (Path("/a"), Path("/b"))

    def test_flags_beat_env(self) -> None:
        config = parse_config(["--port", "9200"], {"DEPLOY_AGENT_PORT": "9100"})
        assert config.port == 9200

    @pytest.mark.parametrize("bad", ["8000", "9000-8000", "0-10", "a-b", "1-70000"])
    def test_bad_port_range_is_a_usage_error(self, bad: str) -> None:
        with pytest.raises(SystemExit):
            parse_config(["--port-range", bad], {})

    def test_bad_env_value_is_a_usage_error(self) -> None:
        with pytest.raises(SystemExit):
            parse_config([], {"DEPLOY_AGENT_PORT": "nine"})


    def test_publish_host_with_swarm_is_refused(self) -> None:
        with pytest.raises(SystemExit, match="--publish-host can't be used with --swarm"):
            parse_config(["--swarm", "--publish-host", "10.0.0.5"], environ={})
        assert parse_config(["--swarm"], environ={}).swarm  # on all addresses, it is fine

    def test_allow_host_header_from_flags_or_env(self) -> None:
        assert parse_config(["--allow-host-header", "a.lab", "--allow-host-header", "b.lab"],
                            environ={}).allow_host_headers == ("a.lab", "b.lab")
        assert parse_config([], environ={"DEPLOY_AGENT_ALLOW_HOST_HEADER": "a.lab, b.lab"}
                            ).allow_host_headers == ("a.lab", "b.lab")

    def test_allow_volume_from_flags_or_env(self) -> None:
        assert parse_config(["--allow-volume", "pgdata", "--allow-volume", "models"],
                            environ={}).allow_volumes == ("pgdata", "models")
        assert parse_config([], environ={"DEPLOY_AGENT_ALLOW_VOLUME": "pgdata, models"}
                            ).allow_volumes == ("pgdata", "models")
        assert parse_config([], environ={}).allow_volumes == ()  # none unless named


class TestSecurityConfig:
    """The token comes from --token-file or DEPLOY_AGENT_TOKEN; image patterns repeat."""

    def test_token_file(self, tmp_path: Path) -> None:
        (tmp_path / "token").write_text("abc123\n")
        assert parse_config(["--token-file", str(tmp_path / "token")], {}).token == "abc123"

    def test_token_env(self) -> None:
        assert parse_config([], {"DEPLOY_AGENT_TOKEN": "xyz"}).token == "xyz"
        assert parse_config([], {}).token is None

    @pytest.mark.parametrize("content", [None, "", "  \n"])
    def test_unreadable_or_empty_token_file_is_one_line(self, tmp_path: Path, content: str | None) -> None:
        path = tmp_path / "token"
        if content is not None:
            path.write_text(content)
        with pytest.raises(SystemExit) as caught:
            parse_config(["--token-file", str(path)], {})
        assert "token file" in str(caught.value) and "\n" not in str(caught.value)

    def test_allow_image_flags_and_env(self) -> None:
        flags = ["--allow-image", "a/*", "--allow-image", "b:1"]
        assert parse_config(flags, {}).allow_images == ("a/*", "b:1")
        assert parse_config([], {"DEPLOY_AGENT_ALLOW_IMAGE": "a/*, b:1"}).allow_images == ("a/*", "b:1")
