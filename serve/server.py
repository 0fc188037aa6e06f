"""A vLLM OpenAI-compatible server as a child process: started on a loopback port, waited for, stopped.

Used by `make demo`, the serving benchmark and the server tests. The server runs in its own process
group and logs to a file; stop() sends SIGINT to the server alone (vLLM then shuts its engine
processes down; a group-wide SIGINT would kill them first) and SIGKILLs the group if it hangs.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def console_script(name: str, module: str) -> list[str]:
    """A console script of this Python environment, or `python -m module` when it is not installed."""
    exe = Path(sys.executable).with_name(name)
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", module]


class ServerProcess:
    """`argv + --host 127.0.0.1 --port PORT` in a new session; `base_url` is http://127.0.0.1:PORT."""

    def __init__(self, argv: list[str], log: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                 port: int | None = None):
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log) if log else None
        out = open(self.log, "wb") if self.log else None
        try:
            self.proc = subprocess.Popen([*argv, "--host", "127.0.0.1", "--port", str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT if out else None,
                                         env=env, start_new_session=True)
        finally:
            if out:
                out.close()

    def wait_ready(self, timeout: float = 900) -> None:
        """Block until GET /health answers 200; raise with the log's tail if the server dies or times out."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode} before it was ready"
                                   f"{self._tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"the server at {self.base_url} was not ready after {timeout:.0f} s{self._tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log and self.log.is_file() else ""

    def _tail(self) -> str:
        text = self.tail()
        return f":\n{text}" if text else ""

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
