"""What the reliability tests look at from outside: HTTP replies, Serve replica processes
(pid, open fds, threads, RSS, listening sockets) and the workers' own block counts."""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass

import ray
import requests

from tandem.router.openai_metrics import get_stats_board


def post(url: str, body: dict | bytes, headers: dict | None = None, timeout: float = 60, **kwargs) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(url, data=data, headers={"Content-Type": "application/json", **(headers or {})},
                         timeout=timeout, **kwargs)


def assert_openai_error(response: requests.Response, status: int | None = None) -> dict:
    """A 4xx/5xx reply with OpenAI's error body; returns the error object."""
    if status is not None:
        assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"], error
    assert error["code"] is None or isinstance(error["code"], str), error  # OpenAI's: an identifier or null
    return error


def sse_events(response: requests.Response) -> list[object]:
    """The `data:` payloads of an SSE reply, JSON-decoded ("[DONE]" kept as the string)."""
    events = []
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            payload = line[len(b"data: "):]
            events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return events


def metric_values(base_url: str) -> dict[str, float]:
    text = requests.get(f"{base_url}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])  # summed over replicas
    return values


# ------------------------------------------------------------------------ replica processes
def replica_names(app: str, deployment: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def replica_pid(name: str) -> int:
    actor = ray.get_actor(name, namespace="serve")
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


@dataclass(frozen=True)
class ProcessFootprint:
    fds: int
    threads: int
    rss_bytes: int


def footprint(pid: int) -> ProcessFootprint:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    rss_pages = int(open(f"/proc/{pid}/statm").read().split()[1])
    return ProcessFootprint(fds, threads, rss_pages * os.sysconf("SC_PAGE_SIZE"))


def listening_addresses(pid: int | None = None) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN owned by process `pid` (default: this one)."""
    proc = f"/proc/{pid or 'self'}"
    inodes = set()
    for fd in os.listdir(f"{proc}/fd"):
        try:
            target = os.readlink(f"{proc}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in open(f"{proc}/net/{table}").read().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_ip, hex_port = local.split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc/net stores each 32-bit word of the address in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((socket.inet_ntop(family, raw), int(hex_port, 16)))
    return found


# ------------------------------------------------------------------------- engine blocks
def worker_stats(app: str) -> dict[str, dict]:
    """Each worker replica's latest `EngineStats` (as pushed to the app's stats board, ≤ 1 s old)."""
    return ray.get(get_stats_board(app).snapshot.remote(), timeout=30)


def wait_until_idle(app: str, base_url: str, num_workers: int, timeout_s: float = 30) -> dict[str, dict]:
    """Waits until the ingress has no request in flight and every worker runs nothing, queues
    nothing and has every KV block free; fails with the last numbers seen otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        in_flight = metric_values(base_url).get("tandem_ingress_requests_in_flight")
        stats = worker_stats(app)
        idle = len(stats) == num_workers and all(
            s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_free_blocks"] == s["num_total_blocks"]
            for s in stats.values())
        if in_flight == 0 and idle:
            return stats
        if time.monotonic() > deadline:
            summary = {r: {k: s[k] for k in ("num_running", "num_waiting", "num_free_blocks", "num_total_blocks")}
                       for r, s in stats.items()}
            raise AssertionError(f"not idle after {timeout_s}s: ingress in flight {in_flight}, workers {summary}")
        time.sleep(0.2)
