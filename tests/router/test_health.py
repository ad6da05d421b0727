"""`GET /health` on a real app while its engine starts: 503 at once, with a JSON body naming the
pool it waits for, for as long as no engine of that pool runs; then 200. The app is the real
ingress in front of the real `LLMWorker`, held in its constructor until the test lets it go (a
real engine start is too quick on a tiny model to be caught reliably)."""
from __future__ import annotations

import os
import time

import pytest
import requests
from ray import serve
from ray.serve.api import RunTarget

from tandem.engine.make_model import make_model
from tandem.router.openai_ingress import OpenAIIngress
from tandem.workers.app import AppArgs, ingress_config
from tandem.workers.serve_worker import LLMWorker
from tests.router.serve_harness import local_serve

ENGINE_KWARGS = {"num_kv_blocks": 64, "max_model_len": 256}
pytestmark = pytest.mark.timeout(300)


class GatedLLMWorker(LLMWorker):
    """`LLMWorker` whose engine starts once the file `gate` exists."""

    def __init__(self, gate: str, *args, **kwargs) -> None:
        while not os.path.exists(gate):
            time.sleep(0.05)
        super().__init__(*args, **kwargs)


def get_health(url: str, timeout: float) -> tuple[int, dict | str, float]:
    started = time.monotonic()
    response = requests.get(url + "/health", timeout=timeout)
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return response.status_code, body, time.monotonic() - started


def test_health_is_503_at_once_until_the_engine_runs_then_200(tmp_path):
    model = str(make_model(tmp_path / "llama", "llama", seed=7))
    gate = tmp_path / "engine-may-start"
    parsed = AppArgs.from_dict({"model": model, "served_model_name": "tiny", "engine_kwargs": ENGINE_KWARGS})
    pool = serve.deployment(GatedLLMWorker, name="LLMWorker").options(ray_actor_options={"num_cpus": 0}).bind(
        str(gate), model, ENGINE_KWARGS, "cpu")
    app = OpenAIIngress.options(ray_actor_options={"num_cpus": 0}).bind(pool, ingress_config(parsed, model))
    with local_serve() as url:
        serve.run_many([RunTarget(app, name="gated", route_prefix="/")],
                       wait_for_applications_running=False)
        deadline = time.monotonic() + 180
        while True:  # until the ingress replica runs, Serve's proxy has no route (404) or holds the request
            status, body, _ = get_health(url, timeout=60)
            if status != 404:
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        for _ in range(5):  # the engine is held: every answer is a quick 503 that says why
            assert status == 503, body
            assert body["status"] == "starting" and body["waiting_for"] == ["LLMWorker"], body
            status, body, elapsed = get_health(url, timeout=10)
            assert elapsed < 1.5, elapsed
        gate.touch()
        deadline = time.monotonic() + 180
        while status != 200:
            assert status == 503 and time.monotonic() < deadline, (status, body)
            time.sleep(0.2)
            status, body, _ = get_health(url, timeout=10)
        assert body == {"status": "ready"}
        assert requests.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60).ok
