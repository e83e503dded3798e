"""Keeps one worker pod registered with every router pod: the `registrar` sidecar of deploy/kubernetes.

The router holds its workers in memory, so a loop, not a one-off postStart hook, registers again
after a router restarts and with router replicas that start later. Router pods are found through
a headless Service that lists them before they are ready (a router is only ready once it has
workers). On SIGTERM the loop stops and the worker is deregistered; `deregister` alone is the
worker container's preStop hook. Standard library only: it runs from the quadrant image.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import signal
import socket
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

log = logging.getLogger("quadrant.registrar")
ROLES = ("prefill", "decode")
_TIMEOUT = 5.0  # seconds for one call to a router


def router_urls(host: str, port: int) -> list[str]:
    """The base URL of every address `host` resolves to: one per router pod behind a headless Service."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []  # no router pod yet
    ips = sorted({str(info[4][0]) for info in infos})
    return [f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}" for ip in ips]


# The router's key, as `quadrant router` reads it: /workers is not public when the router has one.
_API_KEY = os.environ.get("QUADRANT_API_KEY")


def _call(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if _API_KEY:
        headers["Authorization"] = f"Bearer {_API_KEY}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=_TIMEOUT) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, None


def register(router: str, url: str, role: str) -> bool:
    """Register `url` as a `role` worker unless the router already lists it; True if it is registered."""
    status, listing = _call("GET", f"{router}/workers")
    if status == 200 and any(w["url"] == url and w["role"] == role for w in listing["data"]):
        return True
    status, _ = _call("POST", f"{router}/workers", {"url": url, "role": role})
    if status == 200:
        log.info("registered %s worker %s with %s", role, url, router)
    else:
        log.warning("router %s refused to register %s: HTTP %d", router, url, status)
    return status == 200


def deregister(router: str, url: str) -> bool:
    """Remove `url` from every pool of the router; True if it is gone (404: it was never there)."""
    status, _ = _call("DELETE", f"{router}/workers", {"url": url})
    if status == 200:
        log.info("deregistered %s from %s", url, router)
    elif status != 404:
        log.warning("router %s refused to deregister %s: HTTP %d", router, url, status)
    return status in (200, 404)


def _each_router(host: str, port: int, fn: Callable[..., bool], *args: str) -> None:
    for router in router_urls(host, port):
        try:
            fn(router, *args)
        # a router restarting or not up yet; the next round tries again
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as e:
            log.warning("router %s: %s", router, e)


def run_loop(host: str, port: int, url: str, role: str, interval: float, stop: threading.Event) -> None:
    # A pod that had this IP before (possibly of the other role) may still be listed: start clean.
    _each_router(host, port, deregister, url)
    while not stop.is_set():
        _each_router(host, port, register, url, role)
        stop.wait(interval)
    _each_router(host, port, deregister, url)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("register", "deregister"),
                   help="register: keep registering until SIGTERM, then deregister; deregister: once")
    p.add_argument("--url", required=True, help="this worker's base URL, e.g. http://10.1.2.3:8000")
    p.add_argument("--role", choices=ROLES, help="the worker's pool (register only)")
    p.add_argument("--router", default="quadrant-router-pods:8000",
                   help="HOST:PORT of the routers' headless Service")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between registration rounds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    host, _, port = args.router.rpartition(":")
    if args.action == "deregister":
        _each_router(host, int(port), deregister, args.url)
        return 0
    if args.role is None:
        build_parser().error("register needs --role")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run_loop(host, int(port), args.url, args.role, args.interval, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
