"""Fixtures for image tests: a real local registry (Debian's ``docker-registry``) and images
the tests build with umoci and push with skopeo.

* ``registry`` — a :class:`Registry` serving on a free 127.0.0.1 port for the session, its
  storage under /var/tmp (the process is stopped at the end).
* ``work`` — a scratch directory under /var/tmp, removed afterwards.
* ``registry.push(repo_tag, layers, arch=...)`` — build an OCI image from layer tarballs
  (``umoci raw add-layer``) and push it; returns ``host:port/repo:tag``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

TOOLS = ("skopeo", "umoci", "docker-registry")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Registry:
    """A running ``docker-registry`` with filesystem storage.

    Attributes:
        host: ``127.0.0.1:<port>``.
        storage: the registry's storage directory.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.storage = root / "storage"
        self.host = f"127.0.0.1:{_free_port()}"
        config = root / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n"
        )
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"http://{self.host}/v2/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("docker-registry did not start")
            time.sleep(0.05)

    def push(self, repo_tag: str, layers: list[Path], *, arch: str = "amd64", work: Path) -> str:
        """Build an image from ``layers`` (bottom first) and push it as ``repo_tag``."""
        layout = work / f"layout-{repo_tag.replace('/', '_').replace(':', '_')}"
        shutil.rmtree(layout, ignore_errors=True)
        subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
        subprocess.run(["umoci", "new", "--image", f"{layout}:t"], check=True)
        for layer in layers:
            subprocess.run(
                ["umoci", "raw", "add-layer", "--image", f"{layout}:t", str(layer)], check=True
            )
        subprocess.run(
            [
                "umoci",
                "config",
                "--image",
                f"{layout}:t",
                "--architecture",
                arch,
                "--config.cmd",
                "/bin/sh",
            ],
            check=True,
        )
        ref = f"{self.host}/{repo_tag}"
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                f"oci:{layout}:t",
                f"docker://{ref}",
            ],
            check=True,
        )
        return ref

    def manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        """``(raw bytes, media type, digest)`` of a manifest as the registry serves it."""
        response = httpx.get(
            f"http://{self.host}/v2/{repo}/manifests/{reference}",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
        response.raise_for_status()
        return (
            response.content,
            response.headers["content-type"],
            response.headers["docker-content-digest"],
        )

    def stop(self) -> None:
        """Stop the registry process."""
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def work() -> Iterator[Path]:
    """Scratch dir under /var/tmp (the image cache and layouts live here)."""
    root = Path(tempfile.mkdtemp(prefix="sbt-img-", dir="/var/tmp"))
    yield root
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    """A local registry for the session."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/install.sh installs them)")
    root = Path(tempfile.mkdtemp(prefix="sbt-registry-", dir="/var/tmp"))
    instance = Registry(root)
    yield instance
    instance.stop()
    shutil.rmtree(root, ignore_errors=True)
