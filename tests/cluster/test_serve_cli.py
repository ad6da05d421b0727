"""`tandem serve` as a user runs it (the real CLI in a subprocess, its own local Ray, the default
tiny model): the ready line comes when the app answers and not before; `/health` until then
is a 503 with a JSON body (or no answer at all while Serve starts the ingress); Ctrl-C stops
it cleanly; and none of Ray's chatter reaches the terminal (the token-authentication notice,
Ray's and Serve's INFO narration, the `graceful_shutdown failed` line of Serve's shutdown)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.router.serve_harness import free_port

pytestmark = pytest.mark.timeout(420)
READY = "serving on http://127.0.0.1:{port}/v1 (Ctrl-C to stop)"
# Lines that must not reach the user: Ray's and Serve's own narration, whoever prints it. (Their
# warnings still do, e.g. the controller's "replicas that have taken more than 30s to initialize"
# on a busy machine.)
NOISE = ("Token authentication", "graceful_shutdown", "Traceback", "Started a local Ray instance",
         "Started Serve in namespace", "is ready at", "Deleting app")
SYSTEM_ACTORS = ("(ServeController", "(ProxyActor")


def is_noise(line: str) -> bool:
    return any(mark in line for mark in NOISE) or (any(a in line for a in SYSTEM_ACTORS) and " INFO " in line)


def test_serve_prints_the_ready_line_when_the_app_answers_and_stops_cleanly(tmp_path):
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": "local", "TANDEM_CACHE": str(tmp_path / "cache")}
    server = subprocess.Popen([sys.executable, "-m", "tandem.cluster.cli", "serve", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                              start_new_session=True)
    stdout: list[str] = []
    stderr: list[str] = []
    ready = threading.Event()

    def read(stream, lines: list[str], watch: bool) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))
            if watch:
                ready.set()

    threads = [threading.Thread(target=read, args=(server.stdout, stdout, True), daemon=True),
               threading.Thread(target=read, args=(server.stderr, stderr, False), daemon=True)]
    for thread in threads:
        thread.start()
    try:
        answers = []  # /health before the ready line: (status, body)
        deadline = time.monotonic() + 300
        while not ready.is_set():
            assert server.poll() is None, (server.returncode, stderr)
            assert time.monotonic() < deadline, ("no ready line", stderr)
            try:
                response = requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
            except requests.RequestException:  # port closed, or the proxy holds it: no ingress yet
                time.sleep(0.2)
                continue
            if not ready.is_set():
                answers.append((response.status_code, response.text))
            time.sleep(0.2)
        assert stdout == [READY.format(port=port)], stdout
        # The line means the app answers, now.
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=2).json() == {"status": "ready"}
        assert requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()["data"][0]["max_model_len"] == 2048
        for status, body in answers:
            if status == 503:
                assert '"status":"starting"' in body.replace(" ", ""), body
            else:  # the proxy before the app's route exists, or the ready answer just before the line
                assert status in (404, 200), (status, body)

        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=120) == 0
        for thread in threads:
            thread.join(timeout=10)
        assert stdout == [READY.format(port=port)], stdout  # nothing printed at the stop either
        noisy = [line for line in stderr if is_noise(line)]
        assert not noisy, noisy
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
