"""Real loopback servers for the HTTP backend tests.

* :func:`start_transformers_serve`: ``transformers serve`` (the real OpenAI-compatible server
  shipped with transformers) on 127.0.0.1 with a local tiny model folder, offline, on CPU.
* :class:`FaultProxy`: a small HTTP proxy on 127.0.0.1 placed between the client and that
  server; it follows a schedule of faults: ``drop`` (close the connection without an answer),
  ``delay:S`` (wait S seconds, then forward), ``status:CODE[:RETRY_AFTER]`` (answer CODE, e.g.
  429 or 500, optionally with a Retry-After header), ``truncate`` (forward, but send only half of
  the upstream's body and close: the declared Content-Length is never reached),
  ``truncate-json`` (half of the body with a matching Content-Length: a 200 whose JSON is cut
  off), ``ok`` (forward). It records every
  request (path, headers, action) for assertions. Everything is bounded and stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _transformers_cli() -> list[str]:
    exe = Path(sys.executable).with_name("transformers")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "transformers.cli.transformers"]


def start_transformers_serve(model_dir: Path, log_path: Path, *, timeout_s: float = 90.0):
    """Start ``transformers serve MODEL_DIR`` on a free loopback port; return (proc, base_url).

    Raises RuntimeError (with the server log) if /health does not answer within ``timeout_s``.
    """
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(log_path.parent / "hf-home"), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    cmd = [*_transformers_cli(), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--dtype", "float32", "--log-level", "warning"]
    log_fh = open(log_path, "wb")  # noqa: SIM115 - closed by stop_process
    proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=env)
    proc._log_fh = log_fh  # type: ignore[attr-defined]
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with contextlib.suppress(OSError), urllib.request.urlopen(base + "/health", timeout=2) as r:
            if r.status == 200:
                return proc, base + "/v1"
        time.sleep(0.5)
    stop_process(proc)
    raise RuntimeError(f"transformers serve did not come up: {log_path.read_text(errors='replace')[-3000:]}")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    fh = getattr(proc, "_log_fh", None)
    if fh is not None:
        fh.close()


class FaultProxy:
    """HTTP/1.1 proxy on 127.0.0.1 with scheduled faults (see module docstring).

    The schedule is consumed one action per incoming request (in arrival order); when it is
    empty every request is forwarded. ``default`` replaces ``ok`` as the action used then.
    """

    def __init__(self, upstream: str, schedule: list[str] | None = None, default: str = "ok") -> None:
        host_port = upstream.split("://", 1)[1].split("/", 1)[0]
        host, port = host_port.rsplit(":", 1)
        self.up_host, self.up_port = host, int(port)
        self.schedule: deque[str] = deque(schedule or [])
        self.default = default
        self.seen: list[dict] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ---- control (test thread) ---------------------------------------------------------------
    def start(self) -> FaultProxy:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()
            self._server.close()
            self._loop.run_until_complete(self._server.wait_closed())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def set_schedule(self, schedule: list[str], default: str | None = None) -> None:
        with self._lock:
            self.schedule = deque(schedule)
            if default is not None:
                self.default = default

    def actions(self) -> list[str]:
        with self._lock:
            return [s["action"] for s in self.seen]

    def _next_action(self) -> str:
        with self._lock:
            return self.schedule.popleft() if self.schedule else self.default

    # ---- serving (proxy thread) ----------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            action = self._next_action()
            with self._lock:
                self.seen.append({"method": method, "path": path, "headers": headers,
                                  "body": body.decode("utf-8", "replace"), "action": action})
            if action == "drop":
                return  # close without a response
            if action.startswith("status:"):
                parts = action.split(":")
                code = int(parts[1])
                extra = f"Retry-After: {parts[2]}\r\n" if len(parts) > 2 else ""
                payload = json.dumps({"error": {"message": f"injected {code}", "code": code}}).encode()
                writer.write(
                    f"HTTP/1.1 {code} Injected\r\nContent-Type: application/json\r\n{extra}"
                    f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
                await writer.drain()
                return
            if action.startswith("delay:"):
                await asyncio.sleep(float(action.split(":")[1]))
            await self._forward(method, path, headers, body, writer,
                                cut=action if action.startswith("truncate") else None)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
                await writer.wait_closed()

    async def _forward(self, method: str, path: str, headers: dict, body: bytes,
                       writer: asyncio.StreamWriter, cut: str | None = None) -> None:
        up_r, up_w = await asyncio.open_connection(self.up_host, self.up_port)
        try:
            fwd = {k: v for k, v in headers.items() if k not in ("connection", "keep-alive", "host")}
            fwd["host"] = f"{self.up_host}:{self.up_port}"
            fwd["connection"] = "close"
            fwd["content-length"] = str(len(body))
            req = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fwd.items()) + "\r\n"
            up_w.write(req.encode("latin-1") + body)
            await up_w.drain()
            response = await asyncio.wait_for(up_r.read(), 120)  # upstream closes after answering
            if cut is not None:
                head, _, payload = response.partition(b"\r\n\r\n")
                half = payload[: len(payload) // 2]
                if cut == "truncate-json":
                    head = re.sub(rb"(?im)^content-length:[^\r\n]*", b"Content-Length: %d" % len(half), head)
                response = head + b"\r\n\r\n" + half
            writer.write(response)
            await writer.drain()
        finally:
            up_w.close()
            with contextlib.suppress(Exception):
                await up_w.wait_closed()
