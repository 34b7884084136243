"""Tests for deploy_agent.supervise: background loops cannot die silently."""

from __future__ import annotations

import asyncio
import logging

import pytest

from deploy_agent import supervise
from deploy_agent.supervise import Supervisor


class TestSupervisor:
    """A loop that fails is logged, counted and started again; close() ends them all."""

    async def test_failing_loop_is_restarted_and_counted(
        self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        monkeypatch.setattr(supervise, "MIN_BACKOFF_S", 0.01)
        runs: list[int] = []

        async def flaky() -> None:
            runs.append(len(runs))
            if len(runs) < 3:
                raise TimeoutError("the engine did not answer")
            await asyncio.sleep(3600)

        supervisor = Supervisor()
        with caplog.at_level(logging.ERROR):
            supervisor.start("flaky", flaky)
            for _ in range(200):
                if len(runs) == 3:
                    break
                await asyncio.sleep(0.01)
        assert len(runs) == 3 and supervisor.failures["flaky"] == 2
        assert sum("Background task flaky failed" in r.getMessage() for r in caplog.records) == 2
        await supervisor.close()

    async def test_loop_that_returns_is_restarted(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(supervise, "MIN_BACKOFF_S", 0.01)
        runs: list[int] = []

        async def returns() -> None:
            runs.append(1)

        supervisor = Supervisor()
        supervisor.start("returns", returns)
        await asyncio.sleep(0.1)
        await supervisor.close()
        assert len(runs) >= 2 and supervisor.failures["returns"] >= 1

    async def test_close_cancels_and_waits(self) -> None:
        ended = asyncio.Event()

        async def forever() -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                ended.set()

        supervisor = Supervisor()
        supervisor.start("forever", forever)
        await asyncio.sleep(0)
        await supervisor.close()
        assert ended.is_set()
