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
