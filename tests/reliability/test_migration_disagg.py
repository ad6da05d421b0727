"""No stream lost in a disaggregated app (a real local Serve app: one `PrefillWorker`, two
`DecodeWorker`s behind the OpenAI ingress, KV over kvtransfer; the `openai` client streaming):
- the prefill replica SIGKILLed while remote prefills wait on it: every stream completes with the
  colocated engine's tokens (the decode replicas recompute what did not arrive), and afterwards
  both pools hold no block (56 streams, chat and completions);
- a decode replica SIGKILLed mid-stream: its streams continue on the other decode replica;
- the decode pool scaled down (`tandem scale decode 1`, Serve's external scaler) mid-stream: the
  leaving replica stops taking requests, finishes the streams that end within its drain timeout
  (`drain_timeout_s`, Serve's `graceful_shutdown_timeout_s`), and the streams still running when
  it stops continue on the replica that stays.

Expected outputs come from the colocated offline engine on the same weights (`LLM`): a completion's
prompt is token ids, a chat's is its messages rendered by the model's chat template and tokenized
as the ingress does, so each request's text and usage are known exactly. Half the requests of
each mix are chats."""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import openai
import pytest
import ray
from ray import serve

from tandem.cluster.apps import deploy_app, scale_app
from tandem.engine.llm import LLM
from tandem.protocol.sampling_params import SamplingParams
from tests.reliability.probes import metric_values, replica_names, replica_pid, worker_stats

APP = "migration-disagg"
ENGINE = {"max_model_len": 1024, "num_kv_blocks": 1024, "max_num_seqs": 32, "block_size": 16}
DISAGG = {"remote_prefill_min_tokens": 32, "prefill_timeout_s": 10.0, "kv_wait_timeout_s": 3.0}
TRANSFER = {"timeout_s": 3.0, "connect_timeout_s": 3.0, "heartbeat_s": 0.2, "peer_timeout_s": 2.0,
            "min_message_bytes": 0}
DRAIN_S = 2.0  # the decode pool's drain timeout here (300 s by default)
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def app(ray_serve):
    """The app, deployed as `tandem serve` does (its args recorded, Serve's external scaler on,
    so `scale_app` resizes one pool in place)."""
    args = dict(model=ray_serve["model_dir"], served_model_name="tiny", mode="disaggregated", num_replicas=2,
                prefill_replicas=1, routing_policy="round_robin", engine_kwargs=ENGINE, disagg=DISAGG,
                transfer=TRANSFER, ingress_num_cpus=0, worker_num_cpus=0, health_check_period_s=1.0,
                drain_timeout_s={"decode": DRAIN_S})
    deploy_app(APP, args, route_prefix=f"/{APP}")
    try:
        url = f"{ray_serve['url']}/{APP}"
        yield {"url": url, "client": openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                                    timeout=120)}
    finally:
        serve.delete(APP)


@pytest.fixture(scope="module")
def offline(ray_serve):
    return LLM(ray_serve["model_dir"], **ENGINE)


@dataclass(frozen=True)
class Spec:
    prompt: list[int]  # the token ids the worker gets (a chat's: its rendered messages)
    max_tokens: int
    seed: int | None = None  # seeded requests are prefilled on the decode replica (their generator lives there)
    content: str | None = None  # a chat: its one user message

    def params(self) -> SamplingParams:
        if self.seed is None:
            return SamplingParams(temperature=0.0, max_tokens=self.max_tokens, ignore_eos=True)
        return SamplingParams(temperature=0.9, seed=self.seed, max_tokens=self.max_tokens, ignore_eos=True)


_PROMPT_SEEDS = iter(range(10**6))


def chat_prompt(tokenizer, content: str) -> list[int]:
    """The ids the ingress gives the worker for one user message: the chat template rendered as
    text, then tokenized without special tokens (`router.openai_ingress`)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def specs(offline: LLM, count: int, max_tokens, seeded_every: int = 0,
          lengths: tuple[int, int] = (64, 160)) -> list[Spec]:
    """Prompts of about `lengths` token ids no worker has seen (a prefix hit would keep them off
    the prefill pool); `max_tokens(i)` for each. Requests 1 and 2 of every 4 are chats, whose
    message is half as many random ids decoded to text (its rendered prompt is about as long as
    a completion's), so greedy and seeded requests come as both."""
    tokenizer = offline.get_tokenizer()
    out = []
    for i in range(count):
        rng = random.Random(next(_PROMPT_SEEDS))
        ids = [rng.randrange(5, 600) for _ in range(rng.randrange(*lengths))]
        seed = 500 + i if seeded_every and i % seeded_every == 0 else None
        if i % 4 in (1, 2):
            content = tokenizer.decode(ids[:len(ids) // 2], skip_special_tokens=True)
            out.append(Spec(chat_prompt(tokenizer, content), max_tokens(i), seed, content))
        else:
            out.append(Spec(ids, max_tokens(i), seed))
    return out


def expected(offline: LLM, mix: list[Spec]) -> list[tuple[str, int]]:
    outs = offline.generate([{"prompt_token_ids": s.prompt} for s in mix], [s.params() for s in mix])
    return [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outs]


@dataclass
class Result:
    text: str = ""
    usage: dict | None = None
    error: str | None = None
    replica: str = ""  # the decode replica it started on


def stream(client: openai.OpenAI, spec: Spec) -> Result:
    result = Result()
    extra = {"seed": spec.seed, "temperature": 0.9} if spec.seed is not None else {"temperature": 0.0}
    common = dict(model="tiny", max_tokens=spec.max_tokens, stream=True, stream_options={"include_usage": True},
                  extra_body={"ignore_eos": True}, **extra)
    try:
        if spec.content is not None:
            raw = client.chat.completions.with_raw_response.create(
                messages=[{"role": "user", "content": spec.content}], **common)
        else:
            raw = client.completions.with_raw_response.create(prompt=spec.prompt, **common)
        result.replica = raw.headers.get("x-tandem-replica", "")
        for chunk in raw.parse():
            if chunk.usage is not None:
                result.usage = {"prompt": chunk.usage.prompt_tokens, "completion": chunk.usage.completion_tokens}
            for choice in chunk.choices:
                result.text += (choice.delta.content or "") if spec.content is not None else choice.text
    except Exception as error:  # noqa: BLE001 - reported by the test
        result.error = f"{type(error).__name__}: {error}"
    return result


def run_streams(client: openai.OpenAI, mix: list[Spec], during=None) -> list[Result]:
    """Every spec streamed at once; `during()` runs in this thread meanwhile."""
    with ThreadPoolExecutor(len(mix)) as pool:
        futures = [pool.submit(stream, client, spec) for spec in mix]
        if during is not None:
            during()
        return [f.result(timeout=240) for f in futures]


def check(results: list[Result], mix: list[Spec], want: list[tuple[str, int]]) -> None:
    lost = [(i, r.error) for i, r in enumerate(results) if r.error]
    assert not lost, lost
    for i, (r, spec, (want_text, want_tokens)) in enumerate(zip(results, mix, want)):
        assert r.text == want_text, (i, spec, r.text, want_text)
        assert r.usage == {"prompt": len(spec.prompt), "completion": want_tokens}, (i, r.usage)


def decode_stats() -> dict[str, object]:
    """Each live decode replica's `DecodeWorkerStats`. Serve sends each call to the less busy of two
    replicas, so it takes as many calls as it takes to have reached every one (30 s at most)."""
    handle = serve.get_deployment_handle("DecodeWorker", APP)
    live = set(replica_names(APP, "DecodeWorker"))
    found: dict[str, object] = {}
    deadline = time.monotonic() + 30
    while not set(found) >= live and time.monotonic() < deadline:
        stats = handle.stats.remote().result(timeout_s=30)
        found[stats.replica_id] = stats
    return {name: s for name, s in found.items() if name in live}


def running(deployment: str) -> int:
    return serve.status().applications[APP].deployments[deployment].replica_states.get("RUNNING", 0)


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)
    return value


def wait_until_idle(url: str, num_decode: int, timeout_s: float = 60) -> dict[str, dict]:
    """No request in flight at the ingress; every live engine replica of both pools runs
    nothing and has every KV block free (stats board, filtered to live replicas)."""
    def idle():
        live = set(replica_names(APP, "DecodeWorker")) | set(replica_names(APP, "PrefillWorker"))
        stats = {name: s for name, s in worker_stats(APP).items() if name in live}
        ok = (len(stats) == num_decode + 1 and metric_values(url).get("tandem_ingress_requests_in_flight") == 0
              and all(s["num_running"] == 0 and s["num_waiting"] == 0
                      and s["num_free_blocks"] == s["num_total_blocks"] for s in stats.values()))
        return stats if ok else None

    return wait_for(idle, timeout_s, "every replica idle with every block free")


def kill(name: str) -> None:
    os.kill(replica_pid(name), signal.SIGKILL)


def test_prefill_replica_killed_mid_transfer_loses_no_stream(app, offline):
    wait_for(lambda: running("PrefillWorker") == 1 and running("DecodeWorker") == 2, 120, "the app")
    mix = specs(offline, 56, max_tokens=lambda i: 24, seeded_every=8, lengths=(300, 600))
    want = expected(offline, mix)
    before = {name: s.disagg for name, s in decode_stats().items()}
    [victim] = replica_names(APP, "PrefillWorker")
    pid = replica_pid(victim)

    def in_flight() -> int:
        now = decode_stats().values()
        return sum(s.disagg.remote_prefills_started - s.disagg.remote_prefills_ok - s.disagg.remote_prefills_failed
                   for s in now) - sum(d.remote_prefills_started - d.remote_prefills_ok - d.remote_prefills_failed
                                       for d in before.values())

    waiting_at_kill = []

    def kill_while_prefilling() -> None:
        # A remote prefill seen in flight may end before the kill lands, so the replica is frozen
        # (SIGSTOP) first and the count read again: killed only if some still wait on it.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if in_flight() > 0:
                os.kill(pid, signal.SIGSTOP)
                if (waiting := in_flight()) > 0:
                    os.kill(pid, signal.SIGKILL)
                    waiting_at_kill.append(waiting)
                    return
                os.kill(pid, signal.SIGCONT)
        raise AssertionError("no remote prefill seen in flight")

    results = run_streams(app["client"], mix, kill_while_prefilling)
    check(results, mix, want)
    wait_for(lambda: running("PrefillWorker") == 1 and victim not in replica_names(APP, "PrefillWorker"), 120,
             "the replacement prefill replica")
    stats = wait_until_idle(app["url"], num_decode=2)
    after = decode_stats()  # read once idle: Serve routes the calls to the less busy replica
    # The remote prefills waiting on the victim when it died ended one of two ways: recomputed
    # on the decode replica (its transfer had begun, or the call failed), or served by the
    # replacement (Serve retries a call the dead replica had not started). Either way no
    # stream was lost and no block is held (checked above).
    failed = sum(s.disagg.remote_prefills_failed for s in after.values()) - \
        sum(before[n].remote_prefills_failed for n in after if n in before)
    assert waiting_at_kill and waiting_at_kill[0] >= 1, waiting_at_kill
    print(f"\nprefill killed with {waiting_at_kill[0]} remote prefills waiting on it: {len(mix)} streams, 0 lost, "
          f"{failed} remote prefills recomputed locally; blocks free "
          f"{ {n.split('#', 1)[1]: s['num_free_blocks'] for n, s in stats.items()} }")


def test_decode_replica_killed_mid_stream_loses_no_stream(app, offline):
    wait_for(lambda: running("PrefillWorker") == 1 and running("DecodeWorker") == 2, 120, "the app")
    mix = specs(offline, 16, max_tokens=lambda i: 120, seeded_every=2)
    want = expected(offline, mix)
    migrations_before = metric_values(app["url"]).get("tandem_ingress_migrations_total", 0)
    victim = random.Random(3).choice(replica_names(APP, "DecodeWorker"))

    def kill_mid_stream() -> None:
        wait_for(lambda: (stats := worker_stats(APP).get(victim)) and stats["generation_tokens_total"] > 0
                 and stats["num_running"] >= 4, 60, "streams on the victim")
        time.sleep(0.5)
        kill(victim)

    results = run_streams(app["client"], mix, kill_mid_stream)
    check(results, mix, want)
    migrations = metric_values(app["url"]).get("tandem_ingress_migrations_total", 0) - migrations_before
    assert migrations >= 2, migrations
    wait_for(lambda: running("DecodeWorker") == 2 and victim not in replica_names(APP, "DecodeWorker"), 120,
             "the replacement decode replica")
    wait_until_idle(app["url"], num_decode=2)
    print(f"\ndecode killed: {len(mix)} streams, {int(migrations)} continued on the other decode replica, 0 lost")


def test_scaling_the_decode_pool_down_mid_stream_loses_no_stream(app, offline):
    wait_for(lambda: running("PrefillWorker") == 1 and running("DecodeWorker") == 2, 120, "the app")
    # Short streams end within the leaving replica's drain; long ones outlive it and continue
    # (800 tokens take several times the drain here, whatever the machine's load).
    mix = specs(offline, 16, max_tokens=lambda i: 8 if i % 2 else 800, seeded_every=4, lengths=(64, 160))
    want = expected(offline, mix)
    migrations_before = metric_values(app["url"]).get("tandem_ingress_migrations_total", 0)
    replicas = set(replica_names(APP, "DecodeWorker"))

    def scale_down_mid_stream() -> None:
        wait_for(lambda: all((s := worker_stats(APP).get(n)) and s["num_running"] >= 2 for n in replicas), 60,
                 "streams on both decode replicas")
        scale_app(APP, "decode", 1, timeout_s=None)  # what `tandem scale decode 1` does

    results = run_streams(app["client"], mix, scale_down_mid_stream)
    check(results, mix, want)
    wait_for(lambda: len(replica_names(APP, "DecodeWorker")) == 1, 60, "the leaving replica to stop")
    [stayed] = replica_names(APP, "DecodeWorker")
    [left] = replicas - {stayed}
    on_left = [spec for spec, r in zip(mix, results) if r.replica == left]
    long_on_left = sum(spec.max_tokens > 8 for spec in on_left)
    migrations = metric_values(app["url"]).get("tandem_ingress_migrations_total", 0) - migrations_before
    # The long streams of the leaving replica outlived its drain and continued; its short ones
    # finished there (the counts leave no room for them to have moved).
    assert 1 <= migrations <= long_on_left < len(on_left), (migrations, long_on_left, len(on_left))
    wait_until_idle(app["url"], num_decode=1)
    print(f"\nscale-down: {len(mix)} streams, {len(on_left)} on the leaving replica: {int(migrations)} continued on "
          f"the one that stays after the {DRAIN_S:g} s drain, {len(on_left) - long_on_left} short ones finished "
          f"there, 0 lost")
