"""`quadrant serve MODEL --disagg xPyD`: x prefill and y decode workers on this machine, a router in front.

The workers are `quadrant serve --role ...` subprocesses on 127.0.0.1 (free ports, logs in files,
the CPU threads shared out); the router runs in this process on host:port. A worker that dies later
is not restarted: the router's health checks stop sending to it. Exit stops every worker.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from quadrant import envs
from quadrant.disagg.router import RouterConfig, run_router
from quadrant.disagg.routing import Role
from quadrant.errors import QuadrantError

__all__ = ["launch_disagg", "parse_disagg"]

_SPEC = re.compile(r"([1-9][0-9]*)P([1-9][0-9]*)D", re.IGNORECASE)
_STOP_TIMEOUT = 40.0  # a worker's own drain (--shutdown-timeout, 30 s by default) and then some


def parse_disagg(spec: str) -> tuple[int, int]:
    """'2P1D' -> (2, 1): prefill and decode worker counts."""
    m = _SPEC.fullmatch(spec.strip())
    if m is None:
        raise ValueError(f"--disagg takes xPyD, x prefill and y decode workers, e.g. 1P1D or 2P1D; got {spec!r}")
    return int(m[1]), int(m[2])


@dataclass
class WorkerProcess:
    name: str  # prefill-0, decode-1, ...
    role: Role
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log_tail(self, num_lines: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-num_lines:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_bindable(host: str, port: int) -> None:
    """Fail before any worker starts, rather than after they have loaded, if the router cannot listen."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise QuadrantError(f"the router cannot listen on {host}:{port} ({e.strerror or e}); pick another --port") \
            from None


def _die_with_parent() -> None:
    # Runs in the child before exec: the kernel sends it SIGTERM if the launcher dies, even by SIGKILL.
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_worker(model: str, role: Role, index: int, worker_args: list[str], log_dir: Path,
                 num_threads: int) -> WorkerProcess:
    port = _free_port()
    cmd = [sys.executable, "-m", "quadrant", "serve", model, "--role", role, "--port", str(port)]
    if role == "prefill":
        cmd += ["--kv-port", str(_free_port())]
    name = f"{role}-{index}"
    log_path = log_dir / f"{name}.log"
    with open(log_path, "w") as log:
        # A session of its own: a terminal's Ctrl-C reaches the launcher, which stops the router first.
        proc = subprocess.Popen([*cmd, *worker_args], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": str(num_threads)}, start_new_session=True,
                                preexec_fn=_die_with_parent)
    return WorkerProcess(name, role, f"http://127.0.0.1:{port}", proc, log_path)


def wait_healthy(workers: list[WorkerProcess], poll: float = 0.5) -> None:
    """Until every worker's /health is 200; QuadrantError naming the first that exits meanwhile."""
    pending = list(workers)
    with httpx.Client(timeout=2.0) as client:
        while pending:
            for w in list(pending):
                code = w.proc.poll()
                if code is not None:
                    raise QuadrantError(f"the {w.name} worker exited with code {code} before it was ready; "
                                        f"the end of its log ({w.log_path}):\n{w.log_tail()}")
                try:
                    if client.get(w.url + "/health").status_code == 200:
                        print(f"quadrant: {w.name} ready at {w.url}", file=sys.stderr)
                        pending.remove(w)
                except httpx.HTTPError:
                    pass
            if pending:
                time.sleep(poll)


def stop_workers(workers: list[WorkerProcess]) -> None:
    """SIGTERM all (each drains), wait, then SIGKILL the ones still there."""
    for w in workers:
        if w.proc.poll() is None:
            w.proc.terminate()
    deadline = time.monotonic() + _STOP_TIMEOUT
    for w in workers:
        try:
            w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def launch_disagg(model: str, spec: str, host: str, port: int, worker_args: list[str]) -> int:
    """Start the workers, wait until they are healthy, run the router until SIGINT/SIGTERM, stop the
    workers; the router's exit code. QuadrantError if a worker fails to start."""
    num_prefill, num_decode = parse_disagg(spec)
    _check_bindable(host, port)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per /health poll
    num_threads = max(1, (os.cpu_count() or 1) // (num_prefill + num_decode))
    log_dir = Path(tempfile.mkdtemp(prefix="quadrant-disagg-"))
    # The workers require the key given to them (or in the environment they inherit); the router
    # asks clients for the same one and sends it on.
    api_key = _flag_value(worker_args, "--api-key") or envs.api_key()
    workers: list[WorkerProcess] = []
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM while they load stops them too
    try:
        counts: list[tuple[Role, int]] = [("prefill", num_prefill), ("decode", num_decode)]
        for role, count in counts:
            for i in range(count):
                workers.append(start_worker(model, role, i, worker_args, log_dir, num_threads))
        print(f"quadrant: {num_prefill} prefill + {num_decode} decode workers of {model}, {num_threads} threads "
              f"each, logs in {log_dir}", file=sys.stderr)
        wait_healthy(workers)
        signal.signal(signal.SIGTERM, previous)
        config = RouterConfig(prefill_urls=[w.url for w in workers if w.role == "prefill"],
                              decode_urls=[w.url for w in workers if w.role == "decode"],
                              host=host, port=port, api_key=api_key)
        return run_router(config)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the workers' stop short
        stop_workers(workers)
        signal.signal(signal.SIGTERM, previous)
