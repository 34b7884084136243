"""The bearer token: where it lives, how the agent makes it, how callers on the node find it.

Imported by the daemon and by the client, so it stays small and standard-library only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

TOKEN_FILE = "token"  # in the state dir


class TokenError(ValueError):
    """A token file that can't be used; the message is one line a person can act on."""


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """/var/lib/deploy-agent for root, else $XDG_STATE_HOME/deploy-agent."""
    if os.geteuid() == 0:
        return Path("/var/lib/deploy-agent")
    xdg = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "deploy-agent"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token_file(path: Path) -> str:
    """The token in `path`; TokenError when it is missing, unreadable or empty."""
    try:
        token = path.read_text().strip()
    except OSError as err:
        raise TokenError(f"cannot read token file {path}: {err.strerror}") from None
    if not token:
        raise TokenError(f"token file {path} is empty")
    return token


def load_or_create(state_dir: Path) -> tuple[str, bool]:
    """The token of `<state_dir>/token`, made on first use (mode 0600); and whether it was made.

    It is written whole to a temporary file and linked into place, so a crash never
    leaves a half-written token, and two agents starting at once agree on one.
    """
    path = state_dir / TOKEN_FILE
    if path.exists():
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)  # someone widened it: the token is a root password for the node
        return read_token_file(path), False
    token = secrets.token_urlsafe(32)
    tmp = state_dir / f".{TOKEN_FILE}.{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return read_token_file(path), False
    finally:
        tmp.unlink()
    return token, True


def local_token(environ: Mapping[str, str]) -> str | None:
    """The token of an agent on this machine, from its state dir, when this user can read it."""
    state_dir = Path(environ.get("DEPLOY_AGENT_STATE_DIR") or default_state_dir(environ))
    with contextlib.suppress(OSError, TokenError):
        return read_token_file(state_dir / TOKEN_FILE)
    return None


def token_for(url: str, token: str | None, token_file: str | Path | None,
              environ: Mapping[str, str]) -> str | None:
    """The token a caller sends to `url`.

    Given (the token, a token file, DEPLOY_AGENT_TOKEN, DEPLOY_AGENT_TOKEN_FILE, in that
    order): sent to every node. With
    none, a loopback URL gets the local agent's token from its state dir; it is never sent
    to another host, whatever COMPUTE_NODES lists.
    """
    if token:
        return token
    if token_file:
        return read_token_file(Path(token_file))
    if environ.get("DEPLOY_AGENT_TOKEN", "").strip():
        return environ["DEPLOY_AGENT_TOKEN"].strip()
    if environ.get("DEPLOY_AGENT_TOKEN_FILE"):
        return read_token_file(Path(environ["DEPLOY_AGENT_TOKEN_FILE"]))
    host = urllib.parse.urlsplit(url).hostname or ""
    return local_token(environ) if is_loopback(host) else None
