"""Leaks: a soak of requests with random client disconnects (mid-stream and mid-wait), stop
strings, n > 1 with logprobs, and bad requests, against a real local Serve app with two engine
replicas. Afterwards the ingress has nothing in flight, every worker has every KV block free and
nothing running or queued, and neither the ingress nor any worker process holds more open fds
or threads than after the warm-up round of the same mix.

The default run is a short soak; `-m slow` runs thousands of requests."""
from __future__ import annotations

import json
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.reliability.conftest import app_at
from tests.reliability.probes import footprint, post, replica_names, replica_pid, wait_until_idle

APP = "soak"
ENGINE = {"max_model_len": 512, "num_kv_blocks": 192, "max_num_seqs": 16}
WORDS = "the router keeps each conversation on the replica that holds its cached prefix".split()
FD_SLACK, THREAD_SLACK = 8, 4  # lazily opened pools and sockets; a leak per request is far more


@pytest.fixture(scope="module")
def base_url(ray_serve):
    with app_at(ray_serve, APP, num_replicas=2, engine_kwargs=ENGINE) as url:
        yield url


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 40)))


def _one(base_url: str, seed: int) -> str:
    """Runs one random request; returns its kind, after checking its outcome."""
    rng = random.Random(seed)
    kind = rng.choice(["complete", "chat", "stream", "stream_disconnect", "wait_disconnect", "stop", "n_logprobs",
                       "bad_request", "unknown_model"])
    completions, chat = f"{base_url}/v1/completions", f"{base_url}/v1/chat/completions"
    max_tokens = rng.randrange(1, 40)
    if kind == "complete":
        reply = post(completions, {"prompt": _prompt(rng), "max_tokens": max_tokens, "temperature": 0.8, "seed": seed})
        assert reply.status_code == 200, reply.text
    elif kind == "chat":
        reply = post(chat, {"messages": [{"role": "user", "content": _prompt(rng)}], "max_tokens": max_tokens})
        assert reply.status_code == 200, reply.text
    elif kind in ("stream", "stream_disconnect"):
        body = {"prompt": _prompt(rng), "max_tokens": 200, "ignore_eos": True, "stream": True}
        keep = rng.randrange(1, 6) if kind == "stream_disconnect" else None
        with post(completions, body, stream=True) as reply:
            assert reply.status_code == 200, reply.text
            lines = [line for line, _ in zip((x for x in reply.iter_lines() if x), range(keep or 10**6))]
            if keep is None:
                assert lines[-1] == b"data: [DONE]"
            else:
                assert len(lines) == keep  # then close the connection mid-stream
    elif kind == "wait_disconnect":  # a non-streamed client that gives up before the reply
        try:
            post(completions, {"prompt": _prompt(rng), "max_tokens": 300, "ignore_eos": True},
                 timeout=rng.uniform(0.05, 0.4))
        except requests.exceptions.ReadTimeout:
            pass
    elif kind == "stop":
        reply = post(completions, {"prompt": _prompt(rng), "max_tokens": 60, "stop": [rng.choice("aeiou "), "the"],
                                   "stream": rng.random() < 0.5})
        assert reply.status_code == 200, reply.text
    elif kind == "n_logprobs":
        reply = post(chat, {"messages": [{"role": "user", "content": _prompt(rng)}], "max_tokens": max_tokens, "n": 2,
                            "logprobs": True, "top_logprobs": 2})
        assert reply.status_code == 200, reply.text
        assert len(reply.json()["choices"]) == 2
    elif kind == "bad_request":
        body = rng.choice([{"prompt": [1, 10**9]}, {"prompt": "hi", "max_tokens": 10**6}, {"prompt": "hi", "n": 99},
                           {"prompt": "hi", "min_tokens": 9, "max_tokens": 2}, b'{"prompt": "hi"'])
        assert post(completions, body if isinstance(body, bytes) else json.dumps(body).encode()).status_code == 400
    else:
        assert post(completions, {"model": "nope", "prompt": "hi"}).status_code == 404
    return kind


def _soak(base_url: str, num_requests: int, first_seed: int, concurrency: int = 8) -> Counter:
    with ThreadPoolExecutor(concurrency) as pool:
        return Counter(pool.map(lambda seed: _one(base_url, seed), range(first_seed, first_seed + num_requests)))


def _footprints() -> dict[str, object]:
    names = replica_names(APP, "OpenAIIngress") + replica_names(APP, "LLMWorker")
    return {name: footprint(replica_pid(name)) for name in names}


def _check_soak(base_url: str, num_requests: int) -> None:
    _soak(base_url, 24, first_seed=10**6)  # warm-up: lazy pools, sockets and caches open here
    wait_until_idle(APP, base_url, num_workers=2)
    before = _footprints()
    kinds = _soak(base_url, num_requests, first_seed=0)
    stats = wait_until_idle(APP, base_url, num_workers=2)
    after = _footprints()
    assert set(after) == set(before), "a replica restarted during the soak"
    for name, start in before.items():
        end = after[name]
        assert end.fds <= start.fds + FD_SLACK, f"{name}: fds {start.fds} -> {end.fds}"
        assert end.threads <= start.threads + THREAD_SLACK, f"{name}: threads {start.threads} -> {end.threads}"
    assert len(kinds) == 9 and sum(kinds.values()) == num_requests, kinds
    blocks = {r.rsplit("#", 1)[-1]: f"{s['num_free_blocks']}/{s['num_total_blocks']}" for r, s in stats.items()}
    print(f"\nsoak: {num_requests} requests {dict(kinds)}; blocks free {blocks}; "
          + ", ".join(f"{n.rsplit('#', 2)[-2]} fds {before[n].fds}->{after[n].fds} threads "
                      f"{before[n].threads}->{after[n].threads}" for n in before))


@pytest.mark.timeout(120)
def test_soak_with_cancellations_stops_and_errors_leaks_nothing(base_url):
    _check_soak(base_url, 100)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_long_soak_leaks_nothing(base_url):
    _check_soak(base_url, 3000)
