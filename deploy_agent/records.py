"""A small JSON file of the agent's own in the state dir (images.json, caches.json): read at
start-up, written whole and atomically, by one writer at a time. A write that fails (a full
disk) is kept for /health and the file is written again with the next change."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from deploy_agent.state import write_atomically

_LOGGER = logging.getLogger(__name__)


class RecordFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()
        self.write_error: str | None = None

    def load(self) -> Any:
        """The document, or None when there is none or it can't be read (blocking)."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            _LOGGER.warning("%s is unreadable (%s); its records start afresh", self.path, err)
            return None

    async def save(self, document: Any) -> None:
        async with self._lock:  # never two snapshots interleaved
            try:
                await asyncio.to_thread(write_atomically, self.path, document)
                self.write_error = None
            except OSError as err:
                self.write_error = err.strerror or str(err)
                _LOGGER.warning("%s cannot be written (%s); kept in memory", self.path,
                                self.write_error)
