"""Run an inference server (vLLM's or llama.cpp's) on 127.0.0.1 for as long as a `with` block lasts.

The server starts in a process group of its own, so that stopping it stops every process it
started (vLLM's engine core and workers) and so that a Ctrl-C in the terminal reaches only us: we
stop it ourselves, in `finally`, on any exit. SIGTERM and SIGHUP are turned into an exception for
the same reason (Python's default would end us without running `finally`, leaving servers behind).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..utils.errors import UserError

HOST = "127.0.0.1"  # load tests and benchmarks talk to the loopback interface only


class ServerError(UserError):
    """A server that cannot start: a port in use, a program missing, a model it refuses."""


@dataclass
class Server:
    """A running server: where to send requests, its process, and the file its output goes to."""

    name: str
    port: int
    process: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def free_port() -> int:
    """A port that nothing listens on now (the OS's choice)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def check_port(port: int, option: str = "--port") -> None:
    if not 0 < port < 65536:
        raise ServerError(f"{option} {port} is not a TCP port; give one from 1 to 65535.")
    if port_in_use(port):
        raise ServerError(
            f"port {port} on {HOST} is in use by another program; stop it or give another {option} "
            "(or leave it out: a free port is chosen)."
        )


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stop(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Stop the server and every process of its group, however it ended: SIGTERM, then SIGKILL."""
    pgid = process.pid  # start_new_session: the server leads its own group
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + grace_s
    while process_group_alive(pgid) and time.monotonic() < deadline:  # workers still shutting down
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def wait_until_ready(server: Server, timeout_s: float, ready_path: str = "/health") -> None:
    """Poll `ready_path` until it answers 200; a server that exits or takes too long is an error."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerError(
                f"the {server.name} server exited (code {server.process.returncode}) before it was ready; "
                f"its last output ({server.log}):\n{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(server.url + ready_path, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise ServerError(
        f"the {server.name} server was not ready within {timeout_s:.0f} s (raise --server-timeout); "
        f"its last output ({server.log}):\n{server.log_tail()}"
    )


@contextlib.contextmanager
def exit_on_termination() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise SystemExit (so `finally` blocks run), as Ctrl-C does."""

    def raise_exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    handled = (signal.SIGTERM, signal.SIGHUP)
    try:
        previous = {s: signal.signal(s, raise_exit) for s in handled}
    except ValueError:  # not the main thread: signals cannot be handled here, leave them as they are
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def running_server(
    name: str,
    argv: Sequence[str],
    port: int,
    log: Path,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 600.0,
    ready_path: str = "/health",
) -> Iterator[Server]:
    """Start `argv` (a server listening on 127.0.0.1:`port`), wait until it is ready, yield it, stop it."""
    check_port(port)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    server = Server(name, port, process, log)
    try:
        wait_until_ready(server, timeout_s, ready_path)
        yield server
    finally:
        stop(process)
