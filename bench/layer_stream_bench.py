"""TTFT of a disaggregated request, the prefill's KV streamed layer by layer vs sent after the
whole forward pass: a real Ray cluster of a head and two worker nodes (`prefill`, `decode`
resources), `PrefillWorker` and `DecodeWorker` Serve deployments, KV over kvtransfer (gloo on the
CPU, NCCL on GPUs). Two apps side by side on the same nodes, identical but for the prefill
worker's `stream_layers`; requests alternate between them, one at a time, each prompt fresh (no
prefix-cache hit on either side).

    python bench/layer_stream_bench.py --out bench/results               # CPU, 2k/4k/8k prompts
    python bench/layer_stream_bench.py --prompt-tokens 256 --repeats 1   # a quick look

TTFT is measured at the caller of the decode deployment's handle (request sent -> first token
received): what the ingress would see, without HTTP. The model is `make_model`'s "small" Llama
(4 layers, 4 KV heads of 32) with its context raised to fit the longest prompt.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

APPS = {"streamed": True, "all_at_end": False}


def make_bench_model(folder: Path, max_tokens: int) -> str:
    from tandem.engine.make_model import make_model

    path = make_model(folder, "llama", seed=0, size="small")
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["max_position_embeddings"] = max(config["max_position_embeddings"], max_tokens + 64)
    config_file.write_text(json.dumps(config, indent=2))
    return str(path)


def deploy(model: str, app: str, stream_layers: bool, engine: dict, device: str, transfer: dict):
    from ray import serve

    from tandem.workers.decode_worker import DecodeWorker
    from tandem.workers.prefill_worker import PrefillWorker

    gpu = 1 if device == "cuda" else 0
    prefill = serve.deployment(PrefillWorker, name="PrefillWorker").options(
        num_replicas=1, ray_actor_options={"num_cpus": 0, "num_gpus": gpu, "resources": {"prefill": 1}},
    ).bind(model, engine, device, transfer, stream_layers)
    decode = serve.deployment(DecodeWorker, name="DecodeWorker").options(
        num_replicas=1, ray_actor_options={"num_cpus": 0, "num_gpus": gpu, "resources": {"decode": 1}},
    ).bind(model, prefill, engine, device, {"remote_prefill_min_tokens": 16, "prefill_timeout_s": 600.0,
                                             "kv_wait_timeout_s": 60.0}, transfer)
    return serve.run(decode, name=app, route_prefix=None)


def ttft_ms(handle, request_id: str, prompt: list[int]) -> float:
    from tandem.protocol.worker import WorkerRequest

    request = WorkerRequest(request_id, prompt, temperature=0.0, max_tokens=2, ignore_eos=True)
    started = time.perf_counter()
    stream = handle.options(stream=True).generate.remote(request)
    first = None
    for delta in stream:
        if delta.error is not None:
            raise RuntimeError(delta.error)
        if first is None and any(o.token_ids for o in delta.outputs):
            first = time.perf_counter()
    return (first - started) * 1000


def remote_prefills_ok(handle) -> int:
    return handle.stats.remote().result(timeout_s=60).disagg.remote_prefills_ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", default="2048,4096,8192", help="comma-separated prompt lengths")
    ap.add_argument("--repeats", type=int, default=3, help="requests per length and mode (median reported)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--min-message-mib", type=float, default=1.0,
                    help="the sender coalesces layers up to this size (kvtransfer's default is 64 MiB, "
                         "which for this small model would put every layer into one message)")
    ap.add_argument("--out", type=Path, help="folder for layer_stream_<device>.json and .md")
    args = ap.parse_args(argv)
    lengths = [int(n) for n in args.prompt_tokens.split(",")]

    import ray
    import torch
    from ray import serve
    from ray.cluster_utils import Cluster

    node_gpus = {"num_gpus": 1} if args.device == "cuda" else {}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"prefill": 2}, **node_gpus)
    cluster.add_node(num_cpus=1, resources={"decode": 2}, **node_gpus)
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    serve.start(proxy_location="Disabled")
    rows = []
    try:
        model = make_bench_model(Path(tempfile.mkdtemp()) / "model", max(lengths))
        engine = {"num_kv_blocks": 4 * (max(lengths) // 16 + 2), "max_num_batched_tokens": max(lengths) + 16,
                  "enable_prefix_caching": True}
        transfer = {"min_message_bytes": int(args.min_message_mib * 2**20)}
        handles = {app: deploy(model, app, stream, engine, args.device, transfer) for app, stream in APPS.items()}
        rng = random.Random(0)
        for app, handle in handles.items():  # warm-up: pair the transfer links, first forward
            ttft_ms(handle, f"warm-{app}", [rng.randrange(5, 600) for _ in range(64)])
        for n in lengths:
            times: dict[str, list[float]] = {app: [] for app in APPS}
            for r in range(args.repeats):
                for app, handle in handles.items():
                    before = remote_prefills_ok(handle)
                    prompt = [rng.randrange(5, 600) for _ in range(n)]
                    times[app].append(ttft_ms(handle, f"{app}-{n}-{r}", prompt))
                    if remote_prefills_ok(handle) != before + 1:
                        raise RuntimeError(f"{app}: the {n}-token prompt was not prefilled remotely")
            row = {"prompt_tokens": n,
                   "ttft_ms_streamed": round(statistics.median(times["streamed"]), 2),
                   "ttft_ms_all_at_end": round(statistics.median(times["all_at_end"]), 2),
                   "runs_ms": {app: [round(t, 2) for t in ts] for app, ts in times.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()

    config = json.loads((Path(model) / "config.json").read_text())
    kv_bytes_per_token = (2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"]
                          * 4)  # float32 on the CPU
    result = {
        "benchmark": "layer_stream", "device": args.device,
        "command": "python bench/layer_stream_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__},
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": __import__("os").cpu_count()},
        "model": {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "num_key_value_heads", "head_dim")},
        "kv_bytes_per_token": kv_bytes_per_token,
        "min_message_bytes": int(args.min_message_mib * 2**20),
        "rows": rows,
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"layer_stream_{args.device}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"layer_stream_{args.device}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = [f"# Layer-streamed vs all-at-end KV transfer: TTFT ({result['device']})", "",
             f"`{result['command']}` on {result['when']}; {result['machine']['cpus']} CPUs, "
             f"torch {result['versions']['torch']}, ray {result['versions']['ray']}. One prefill and one decode "
             "worker per mode, each on its own Ray node of one machine; requests one at a time, alternating "
             f"modes; median of the runs. Model: {result['model']}, {result['kv_bytes_per_token']} KV bytes per "
             "token.", "",
             "| prompt tokens | TTFT streamed (ms) | TTFT all at end (ms) | streamed / all at end |",
             "| ---: | ---: | ---: | ---: |"]
    for row in result["rows"]:
        ratio = row["ttft_ms_streamed"] / row["ttft_ms_all_at_end"]
        lines.append(f"| {row['prompt_tokens']} | {row['ttft_ms_streamed']:.1f} | {row['ttft_ms_all_at_end']:.1f} "
                     f"| {ratio:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
