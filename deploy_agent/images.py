"""The images deploys use: pulls ahead of a deploy, and what the node has and who deployed it.

`images.json` in the state dir remembers, per image reference, when it was last deployed,
by which services, and its last cold start (the queue's and eviction's estimates), across
restarts. A pull here always asks the registry (a moved tag is refreshed); a deploy pulls
only what is missing. In front of a swarm the engine's API can't pull onto another node:
a pull is refused there, and each node pulls at its first deploy, with the credentials the
service is created with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import cattrs

from deploy_agent.config import Config
from deploy_agent.errors import AgentError, ImageNotFound, NotSupported
from deploy_agent.models import DATE_TIME, ColdStart, HealthWarning, JSONObject, PullAnswer, rfc3339
from deploy_agent.policy import check_image, image_allowed
from deploy_agent.records import RecordFile
from deploy_agent.registry_auth import RegistryCredentials

_LOGGER = logging.getLogger(__name__)

MAX_SERVICES_LISTED = 32  # per image, the names that deployed it most recently
MAX_RECORDS = 512  # images remembered; the least recently deployed are forgotten first
MAX_PULLS = 4  # POST /images/pull and --prepull pulls at once; more wait their turn


class ImageEngine(Protocol):
    """What the store asks of the engine adapter."""

    credentials: RegistryCredentials

    async def pull(self, ref: str, on_progress: Callable[[JSONObject], None]) -> None: ...

    async def list_images(self) -> list[JSONObject]: ...

    async def inspect_image(self, ref: str) -> JSONObject | None: ...


@attrs.define
class ImageRecord:
    """What the agent remembers of an image it deployed."""

    last_deployed: float  # wall clock
    services: list[str] = attrs.field(factory=list)  # most recent last
    cold_start: ColdStart | None = None


@attrs.frozen
class ImageView:
    """A `GET /images` entry: an image on the node that deploys may use."""

    reference: str
    digest: str | None
    size_bytes: int
    last_deployed: str | None = attrs.field(metadata={"schema": DATE_TIME})
    services: list[str]
    cold_start: ColdStart | None


class ImageStore:
    """Pulls (under the image policy) and the image records."""

    def __init__(self, engine: ImageEngine, config: Config, converter: cattrs.Converter, *,
                 can_pull: bool = True) -> None:
        self._engine = engine
        self._config = config
        self._converter = converter
        self._can_pull = can_pull
        self._file = RecordFile(config.state_dir / "images.json")
        self._records: dict[str, ImageRecord] = {}  # by reference as `docker images` lists it
        self._pulls = asyncio.Semaphore(MAX_PULLS)
        self.prepull_failures: dict[str, str] = {}  # by image: why its --prepull failed

    def load(self) -> None:
        """Read images.json (blocking: run off the event loop at start-up)."""
        document = self._file.load()
        try:
            self._records = self._converter.structure(document or {}, dict[str, ImageRecord])
        except cattrs.BaseValidationError as err:
            _LOGGER.warning("%s is not what it should be (%s); image records start afresh",
                            self._file.path, err)

    def cold_start_of(self, image: str) -> ColdStart | None:
        record = self._records.get(listed_as(image))
        return record.cold_start if record is not None else None

    async def deployed(self, image: str, name: str, cold_start: ColdStart) -> None:
        """Record a deploy; a write that fails is retried with the next (the deploy stands)."""
        record = self._records.setdefault(listed_as(image), ImageRecord(last_deployed=time.time()))
        record.last_deployed = time.time()
        others = [n for n in record.services if n != name]
        record.services = [*others[-MAX_SERVICES_LISTED + 1:], name]
        record.cold_start = cold_start
        if len(self._records) > MAX_RECORDS:
            for forgotten in sorted(self._records, key=lambda ref: self._records[ref].last_deployed)[
                    :len(self._records) - MAX_RECORDS]:
                del self._records[forgotten]
        await self._file.save(self._converter.unstructure(self._records))

    async def pull(self, image: str, progress: Callable[[JSONObject], None]) -> PullAnswer:
        """Pull `image` now, asking its registry even when the node has it; what it is now."""
        check_image(image, self._config)
        if not self._can_pull:
            raise NotSupported(
                "In front of a swarm the engine's API cannot pull onto another node ahead of "
                "time; each node pulls at its first deploy of the image, with the agent's "
                "registry credentials.", image=image)
        if self._pulls.locked():
            progress({"event": "waiting", "reason": "pulls_busy",
                      "message": f"{MAX_PULLS} pulls are under way on this node"})
        async with self._pulls:
            await self._engine.pull(image, lambda step: progress({"event": "pull", **step}))
        found = await self._engine.inspect_image(image)
        if found is None:  # removed under us, or the engine lost it
            raise ImageNotFound(f"Image {image} was pulled but is not on this node now; pull it "
                                "again.", image=image)
        return PullAnswer(image=image, digest=_digest(found.get("RepoDigests") or []),
                          size_bytes=int(found.get("Size", 0)))

    async def prepull(self, images: tuple[str, ...]) -> None:
        """--prepull at start-up, one after another; what fails is logged and on /health."""
        for image in images:
            try:
                await self.pull(image, lambda step: None)
                self.prepull_failures.pop(image, None)
                _LOGGER.info("Pre-pulled %s", image)
            except AgentError as err:
                self.prepull_failures[image] = err.message
                _LOGGER.warning("Could not pre-pull %s: %s", image, err.message)

    async def views(self) -> list[ImageView]:
        """The node's images that deploys may use, by reference."""
        views = []
        for image in await self._engine.list_images():
            digests = image.get("RepoDigests") or []
            for reference in image.get("RepoTags") or []:
                if reference.startswith("<none>") or not image_allowed(reference, self._config):
                    continue
                record = self._records.get(reference)
                views.append(ImageView(
                    reference=reference, digest=_digest(digests), size_bytes=int(image.get("Size", 0)),
                    last_deployed=rfc3339(record.last_deployed) if record else None,
                    services=list(record.services) if record else [],
                    cold_start=record.cold_start if record else None))
        return sorted(views, key=lambda view: view.reference)

    def warnings(self) -> list[HealthWarning]:
        found = [HealthWarning("registry_credentials", f"Registry credentials: {problem}")
                 for problem in self._engine.credentials.problems.values()]
        found += [HealthWarning("prepull_failed", f"--prepull {image} failed: {why}")
                  for image, why in sorted(self.prepull_failures.items())]
        if self._file.write_error is not None:
            found.append(HealthWarning("images_not_writable", f"images.json cannot be written "
                                       f"({self._file.write_error}); image records are kept in "
                                       "memory."))
        return found


def listed_as(image: str) -> str:
    """A reference as `docker images` lists it: with its tag (`:latest` when none), and
    without Docker Hub's `docker.io/` and `library/`. A digest reference stays as it is."""
    if "@" in image:
        return image
    if ":" not in image.rsplit("/", 1)[-1]:
        image += ":latest"
    for prefix in ("docker.io/", "index.docker.io/"):
        image = image.removeprefix(prefix)
    return image.removeprefix("library/")


def _digest(repo_digests: list[Any]) -> str | None:
    """The content digest (sha256:...) of an image's first repository digest."""
    for entry in repo_digests:
        if isinstance(entry, str) and "@" in entry:
            return entry.split("@", 1)[1]
    return None
