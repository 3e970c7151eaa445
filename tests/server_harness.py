"""`kbctl serve` for real in tests: its own process on a free loopback port, and an HTTP client."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import httpx
from daemon_harness import KBCTL, Daemon
from waiting import wait_until


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png_bytes(picture: Any) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def chat_body(model: str, question: str, image: bytes | None) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": question}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    return {"model": model, "messages": [{"role": "user", "content": content}]}


class Server:
    """One `kbctl serve` process of a daemon's installation."""

    def __init__(self, daemon: Daemon, *args: str, port: int | None = None) -> None:
        self.daemon, self.args = daemon, args
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = daemon.home / f"server-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> Server:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([*KBCTL, "serve", "--port", str(self.port), *self.args],
                                        env={**os.environ, **self.daemon.env}, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        wait_until(self._healthy, timeout, f"the server on port {self.port}", describe=self.log_tail)
        return self

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the server exited with {self.process.returncode}\n{self.log_tail()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self) -> str:
        return "\n".join(self.log().splitlines()[-30:])

    def client(self, token: str | None, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


def make_token(daemon: Daemon, name: str, role: str) -> str:
    return daemon.kbctl("token", "create", name, "--role", role, "--json")["token"]


def all_logs(*folders: Path) -> str:
    """Every log file written under `folders` (servers, workers), for searches of what leaked."""
    return "\n".join(p.read_text(errors="replace") for folder in folders for p in sorted(folder.rglob("*.log")))
