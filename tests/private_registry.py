"""A private registry as labs run them: TLS with its own CA, and a login (htpasswd).

It listens on an address of a bridge with no ports that the fixture creates, not on
loopback: the engine treats 127.0.0.0/8 registries as insecure and would skip the CA
check. Its CA is trusted by the test engine only (/etc/docker/certs.d/<host:port>/ca.crt,
read at each pull). Everything is removed afterwards: the registry, the bridge, the CA
directory, the images pushed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import bcrypt

CERTS_D = Path("/etc/docker/certs.d")


@attrs.frozen
class PrivateRegistry:
    host: str  # address:port, as image references name it
    user: str
    password: str
    image: str  # an image only this registry has

    def login(self, docker_config: Path, password: str | None = None) -> None:
        """`docker login` as a user does it, writing `docker_config`/config.json."""
        subprocess.run(["docker", "login", self.host, "-u", self.user, "--password-stdin"],
                       input=(password or self.password).encode(), check=True, capture_output=True,
                       env={**os.environ, "DOCKER_CONFIG": str(docker_config)}, timeout=60)


def _free_bridge() -> tuple[str, str]:
    """A bridge name and a 10.213.x.1 address that this machine does not use yet."""
    used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    for third in range(10, 250):
        address = f"10.213.{third}.1"
        if f" {address}/" not in used:
            return f"dabr{third}", address
    raise RuntimeError("no free 10.213.x.1 address for the registry's bridge")


def _free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        port: int = probe.getsockname()[1]
        return port


def _certificates(root: Path, address: str) -> None:
    """ca.crt, and server.crt/server.key for `address` signed by it."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True, timeout=60)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
            "-keyout", "ca.key", "-out", "ca.crt")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={address}",
            "-keyout", "server.key", "-out", "server.csr")
    (root / "san.cnf").write_text(f"subjectAltName=IP:{address}\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "server.crt")


def _wait_listening(address: str, port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection((address, port), timeout=0.2).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the private registry did not start") from None
            time.sleep(0.05)


@contextmanager
def private_registry(root: Path, base_image: str) -> Iterator[PrivateRegistry]:
    """A TLS registry that requires a login, holding one image built on `base_image`."""
    binary = shutil.which("docker-registry")
    if binary is None or shutil.which("ip") is None or shutil.which("openssl") is None:
        raise RuntimeError("docker-registry, ip and openssl are needed (.ci/run installs them)")
    bridge, address = _free_bridge()
    user, password = "lab", "pw-" + secrets.token_hex(12)
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True, capture_output=True)
    process: subprocess.Popen[bytes] | None = None
    trust: Path | None = None
    pushed: str | None = None
    try:
        subprocess.run(["ip", "addr", "add", f"{address}/24", "dev", bridge], check=True, capture_output=True)
        subprocess.run(["ip", "link", "set", bridge, "up"], check=True, capture_output=True)
        _certificates(root, address)
        (root / "htpasswd").write_bytes(
            f"{user}:".encode() + bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)) + b"\n")
        port = _free_port(address)
        host = f"{address}:{port}"
        (root / "config.yml").write_text(json.dumps({
            "version": 0.1,
            "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
            "http": {"addr": host, "tls": {"certificate": str(root / "server.crt"),
                                           "key": str(root / "server.key")}},
            "auth": {"htpasswd": {"realm": "test", "path": str(root / "htpasswd")}},
            "log": {"level": "error"},
        }))
        trust = CERTS_D / host
        trust.mkdir(parents=True)
        shutil.copy(root / "ca.crt", trust / "ca.crt")
        process = subprocess.Popen([binary, "serve", str(root / "config.yml")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_listening(address, port, process)
        registry = PrivateRegistry(host=host, user=user, password=password,
                                   image=f"{host}/lab/private:{time.monotonic_ns()}")
        pusher = root / "pusher"
        registry.login(pusher)
        context = root / "image"
        context.mkdir()
        (context / "blob").write_bytes(os.urandom(1024 * 1024))
        (context / "Dockerfile").write_text(f"FROM {base_image}\nCOPY blob /blob\n")
        pushed = registry.image
        env = {**os.environ, "DOCKER_CONFIG": str(pusher)}
        for command in (["docker", "build", "-q", "-t", pushed, str(context)],
                        ["docker", "push", pushed], ["docker", "rmi", pushed]):
            subprocess.run(command, check=True, capture_output=True, env=env, timeout=120)
        yield registry
    finally:
        if pushed is not None:
            subprocess.run(["docker", "rmi", "-f", pushed], capture_output=True, timeout=60)
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
        if trust is not None:
            shutil.rmtree(trust, ignore_errors=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
