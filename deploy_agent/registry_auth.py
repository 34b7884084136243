"""Registry credentials, found where `docker login` keeps them for the agent's user.

The Docker client config (`--registry-auth PATH`, else `$DOCKER_CONFIG/config.json`, else
`~/.docker/config.json`) is read at every pull, so a `docker login` takes effect at once:
`credHelpers` names a `docker-credential-<name>` program per registry, `credsStore` one for
all, `auths` holds the rest (`auth`: base64 of user:password, or `identitytoken`). The
engine gets them as its X-Registry-Auth header. A secret never leaves this module but in
that header: Credential's repr hides it, and nothing here logs it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

DOCKER_HUB = "docker.io"
HUB_SERVER = "https://index.docker.io/v1/"  # the name Docker Hub has in config files and helpers
HUB_HOSTS = frozenset({DOCKER_HUB, "index.docker.io", "registry-1.docker.io"})
HELPER_TIMEOUT_S = 10.0
HELPER_OUTPUT_LIMIT = 64 * 1024
REAP_TIMEOUT_S = 5.0  # for a killed helper to be gone
HELPER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # docker-credential-<this>


def registry_of(image: str) -> str:
    """The registry an image reference pulls from, as Docker normalises it: the first path
    component when it looks like a host (a dot, a port, or `localhost`), else Docker Hub."""
    first, slash, _ = image.partition("/")
    if not slash or not ("." in first or ":" in first or first == "localhost"):
        return DOCKER_HUB
    return DOCKER_HUB if first in HUB_HOSTS else first


def _host_of(key: str) -> str:
    """A config key (`https://index.docker.io/v1/`, `registry:5000`) as a registry name."""
    host = key.split("://", 1)[-1].split("/", 1)[0]
    return DOCKER_HUB if host in HUB_HOSTS else host


def server_address(registry: str) -> str:
    return HUB_SERVER if registry == DOCKER_HUB else registry


@attrs.frozen
class Credential:
    """What the agent sends one registry. repr shows neither the user nor the secret."""

    registry: str
    username: str = attrs.field(repr=False)
    secret: str = attrs.field(repr=False)
    identity_token: bool = False

    def header(self) -> str:
        """The engine's X-Registry-Auth value: base64url of the auth config JSON."""
        body: dict[str, str] = {"serveraddress": server_address(self.registry)}
        if self.identity_token:
            body["identitytoken"] = self.secret
        else:
            body.update(username=self.username, password=self.secret)
        return base64.urlsafe_b64encode(json.dumps(body).encode()).decode()


class CredentialProblem(Exception):
    """The config or a helper could not be used; the pull goes on without credentials."""


def default_config_path(environ: Mapping[str, str]) -> Path:
    if environ.get("DOCKER_CONFIG"):
        return Path(environ["DOCKER_CONFIG"]) / "config.json"
    return Path(environ.get("HOME") or Path.home()) / ".docker" / "config.json"


class RegistryCredentials:
    """Looks up the credential for an image's registry; `problems` says, for /health, what
    could not be used on the last lookup (a missing helper, an unreadable config)."""

    def __init__(self, path: Path | None = None, environ: Mapping[str, str] | None = None) -> None:
        self.path = path if path is not None else default_config_path(environ or os.environ)
        self.problems: dict[str, str] = {}  # by what it is about: the config, or a helper

    async def lookup(self, image: str) -> Credential | None:
        """The credential to pull `image` with; None when there is none (or it can't be had,
        which `problems` then says)."""
        registry = registry_of(image)
        try:
            config = await asyncio.to_thread(self._read)
            self.problems.pop("config", None)
        except CredentialProblem as err:
            self.problems["config"] = str(err)
            return None
        helpers = config.get("credHelpers") or {}
        helper = next((name for key, name in helpers.items() if _host_of(key) == registry),
                      None) or config.get("credsStore")
        if isinstance(helper, str) and helper:
            try:
                found = await self._from_helper(helper, registry)
                self.problems.pop(f"helper {helper}", None)
                return found
            except CredentialProblem as err:
                self.problems[f"helper {helper}"] = str(err)
                return None
        return _from_auths(config.get("auths") or {}, registry)

    def _read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise CredentialProblem(f"{self.path} cannot be read ({err.strerror})") from None
        try:
            config = json.loads(text)
        except ValueError:
            raise CredentialProblem(f"{self.path} is not valid JSON") from None
        if not isinstance(config, dict):
            raise CredentialProblem(f"{self.path} is not a JSON object")
        for key, kind in (("auths", dict), ("credHelpers", dict), ("credsStore", str)):
            if key in config and not isinstance(config[key], kind):
                raise CredentialProblem(f"{self.path}: {key} is not a JSON "
                                        f"{'object' if kind is dict else 'string'}")
        return config

    async def _from_helper(self, helper: str, registry: str) -> Credential | None:
        if not HELPER_NAME_RE.fullmatch(helper):
            raise CredentialProblem(f"{self.path} names a credential helper {helper[:40]!r} that "
                                    "is not a plain name; it is not run")
        program = f"docker-credential-{helper}"
        try:
            process = await asyncio.create_subprocess_exec(
                program, "get", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL)
        except OSError:
            raise CredentialProblem(f"the credential helper {program} named in {self.path} is "
                                    "not installed (or not on the agent's PATH); pulls from "
                                    f"{registry} go without credentials") from None
        try:
            async with asyncio.timeout(HELPER_TIMEOUT_S):
                out = await _answer(process, server_address(registry).encode())
        except TimeoutError:
            raise CredentialProblem(f"the credential helper {program} did not answer within "
                                    f"{HELPER_TIMEOUT_S:g} s") from None
        finally:  # whatever happened (a time-out, a cancellation, too much said): it ends
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            await _reaped(process)
        if out is None:
            raise CredentialProblem(f"the credential helper {program} said more than "
                                    f"{HELPER_OUTPUT_LIMIT // 1024} KiB") from None
        if process.returncode != 0:
            return None  # "credentials not found": it has none for this registry
        try:
            found = json.loads(out)
            username, secret = found["Username"], found["Secret"]
            if not isinstance(username, str) or not isinstance(secret, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise CredentialProblem(f"the credential helper {program} answered something that "
                                    "is not its JSON") from None
        return Credential(registry, username, secret, identity_token=username == "<token>")


async def _reaped(process: asyncio.subprocess.Process) -> None:
    """Wait, bounded, for a helper's end. Its output is drained first: asyncio reports a
    process done only once its pipes are, and a pipe whose reader stopped (a helper that
    said too much) is never drained by itself."""
    assert process.stdout is not None
    with contextlib.suppress(TimeoutError, OSError):
        async with asyncio.timeout(REAP_TIMEOUT_S):
            while await process.stdout.read(HELPER_OUTPUT_LIMIT):
                pass
            await process.wait()


async def _answer(process: asyncio.subprocess.Process, question: bytes) -> bytes | None:
    """Ask the helper and read its answer to the end; None when it says too much."""
    assert process.stdin is not None and process.stdout is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        process.stdin.write(question)
        await process.stdin.drain()
        process.stdin.close()
    out = await process.stdout.read(HELPER_OUTPUT_LIMIT + 1)
    if len(out) > HELPER_OUTPUT_LIMIT:
        return None
    while chunk := await process.stdout.read(HELPER_OUTPUT_LIMIT + 1 - len(out)):
        out += chunk
        if len(out) > HELPER_OUTPUT_LIMIT:
            return None
    await process.wait()
    return out


def _from_auths(auths: Mapping[str, Any], registry: str) -> Credential | None:
    for key, entry in auths.items():
        if _host_of(key) != registry or not isinstance(entry, Mapping):
            continue
        if entry.get("identitytoken"):
            return Credential(registry, "", str(entry["identitytoken"]), identity_token=True)
        if entry.get("auth"):
            try:
                username, _, secret = base64.b64decode(str(entry["auth"])).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                continue
            return Credential(registry, username, secret)
        if entry.get("username") and entry.get("password"):
            return Credential(registry, str(entry["username"]), str(entry["password"]))
    return None
