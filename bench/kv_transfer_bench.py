"""KV transfer benchmark: the layer-streaming kvtransfer path vs raw send/recv of one buffer.

Two processes, one per device (plain multiprocessing, no torchrun): process 0 is the prefill
side (KVSender), process 1 the decode side (KVReceiver). For each request size, the KV blocks of
a Llama-3-8B-shaped model (32 layers, 8 KV heads, head dim 128, block 16, bf16) go from random
source block ids to different destination block ids, handed to `send_layers` one layer at a time
as a prefill would. The baseline is one `send`/`recv` of a contiguous buffer of the same bytes
on a pair group of the same backend (NCCL on GPU, gloo on CPU), in the same run.

Times are taken on the receiving side, from a barrier both processes leave together to "all
bytes are in place" (receiver's `wait()` returned / recv completed and synchronized).

  GPU:  python bench/kv_transfer_bench.py --out bench/results
  CPU:  python bench/kv_transfer_bench.py --device cpu --tokens 64,128 --layers 4 --kv-heads 2 \
            --head-dim 16 --iters 3 --out /tmp/kvbench
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

# NVLink multicast must stay off on the GPU hosts (see shared/OFFLINE_GPU_HOST.md).
_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class BenchArgs:
    device: str
    tokens: tuple[int, ...]
    layers: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    iters: int
    warmup: int
    min_message_mb: float
    timeout_s: float


def _device(args: BenchArgs, rank: int):
    import torch

    if args.device == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_cache(args: BenchArgs, num_blocks: int, device, seed: int):
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (args.layers, 2, num_blocks, args.block_size, args.kv_heads, args.head_dim)
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(getattr(torch, args.dtype))


def _block_ids(num_blocks: int, n: int, seed: int) -> list[int]:
    import torch

    return torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))[:n].tolist()


def _configs(args: BenchArgs):
    from tandem.kvtransfer import KVTransferConfig

    common = dict(timeout_s=args.timeout_s, connect_timeout_s=args.timeout_s,
                  peer_timeout_s=max(5.0, args.timeout_s))
    return {
        "streamed": KVTransferConfig(min_message_bytes=int(args.min_message_mb * (1 << 20)), **common),
        "per_layer": KVTransferConfig(min_message_bytes=0, **common),
    }


def _raw_group(store, rank: int, device, timeout_s: float):
    from tandem.kvtransfer.pair import make_pair_group

    return make_pair_group(store, "bench/raw", rank, device, timeout_s)


def _sender_main(args: BenchArgs, barrier, queue_in, queue_out) -> None:
    os.environ.update(_ENV)
    import torch
    from torch.distributed import TCPStore

    from tandem.kvtransfer import KVSender
    from tandem.kvtransfer.pair import abort_group

    device = _device(args, 0)
    max_blocks = max(args.tokens) // args.block_size
    cache = _make_cache(args, 2 * max_blocks + 1, device, seed=1)
    address, raw_port = queue_in.get(timeout=120)
    store = TCPStore("127.0.0.1", raw_port, is_master=False, timeout=timedelta(seconds=args.timeout_s))
    raw = _raw_group(store, 0, device, args.timeout_s)
    senders = {name: KVSender(cache, cfg) for name, cfg in _configs(args).items()}
    for tokens in args.tokens:
        n = tokens // args.block_size
        src = _block_ids(cache.shape[2], n, seed=tokens)
        dst = _block_ids(cache.shape[2], n, seed=tokens + 1)
        nbytes = args.layers * 2 * n * cache[0, 0, 0].numel() * cache.element_size()
        buf = torch.empty(nbytes // cache.element_size(), dtype=cache.dtype, device=device)
        for variant in ("raw", *senders):
            for it in range(args.warmup + args.iters):
                barrier.wait()
                if variant == "raw":
                    raw.send([buf], 1, 0).wait()
                    _sync(device)
                else:
                    session = senders[variant].begin(f"{variant}-{tokens}-{it}", address, src, dst)
                    for layer in range(args.layers):
                        session.send_layers(layer, layer + 1)
                    session.finish()
                barrier.wait()
        queue_out.put(("checksum", tokens, cache[:, :, src].double().sum().item()))
    for sender in senders.values():
        sender.close()
    abort_group(raw)


def _receiver_main(args: BenchArgs, barrier, queue_to_sender, queue_out) -> None:
    os.environ.update(_ENV)
    import torch
    from torch.distributed import TCPStore

    from tandem.kvtransfer import KVReceiver
    from tandem.kvtransfer.pair import abort_group

    device = _device(args, 1 if args.device == "cuda" else 0)
    max_blocks = max(args.tokens) // args.block_size
    cache = _make_cache(args, 2 * max_blocks + 1, device, seed=2)
    receiver = KVReceiver(cache, _configs(args)["streamed"])
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=args.timeout_s))
    queue_to_sender.put((receiver.address, store.port))
    raw = _raw_group(store, 1, device, args.timeout_s)
    variants = ("raw", *_configs(args))
    for tokens in args.tokens:
        n = tokens // args.block_size
        dst = _block_ids(cache.shape[2], n, seed=tokens + 1)
        nbytes = args.layers * 2 * n * cache[0, 0, 0].numel() * cache.element_size()
        buf = torch.empty(nbytes // cache.element_size(), dtype=cache.dtype, device=device)
        row = {"tokens": tokens, "bytes": nbytes}
        for variant in variants:
            seconds = []
            for it in range(args.warmup + args.iters):
                handle = None
                if variant != "raw":
                    handle = receiver.expect(f"{variant}-{tokens}-{it}", dst, args.layers)
                barrier.wait()
                t0 = time.perf_counter()
                if variant == "raw":
                    raw.recv([buf], 0, 0).wait()
                    _sync(device)
                else:
                    handle.wait()
                elapsed = time.perf_counter() - t0
                barrier.wait()
                if it >= args.warmup:
                    seconds.append(elapsed)
            median = statistics.median(seconds)
            row[variant] = {"ms": median * 1e3, "gbps": nbytes / median / 1e9,
                            "ms_min": min(seconds) * 1e3}
        row["received_checksum"] = cache[:, :, dst].double().sum().item()
        queue_out.put(("row", row))
    queue_out.put(("metrics", asdict(receiver.metrics())))
    receiver.close()
    abort_group(raw)


def _device_name(args: BenchArgs) -> str:
    if args.device != "cuda":
        return "cpu"
    import torch

    words = torch.cuda.get_device_name(0).lower().replace("nvidia", "").split()
    return "".join(c if c.isalnum() else "_" for c in words[0]) if words else "gpu"


def run(args: BenchArgs) -> dict:
    os.environ.update(_ENV)  # inherited by the spawned processes too
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    to_sender, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_sender_main, args=(args, barrier, to_sender, results)),
             ctx.Process(target=_receiver_main, args=(args, barrier, to_sender, results))]
    for proc in procs:
        proc.start()
    rows, checksums, metrics = [], {}, {}
    deadline = time.monotonic() + 60 + 30 * len(args.tokens) * (args.iters + args.warmup)
    while len(rows) < len(args.tokens) or len(checksums) < len(args.tokens) or not metrics:
        if time.monotonic() > deadline or not any(p.is_alive() for p in procs) and results.empty():
            for proc in procs:
                proc.kill()
            raise RuntimeError("benchmark processes died or timed out; see their output above")
        try:
            kind, *payload = results.get(timeout=1)
        except Exception:
            continue
        if kind == "row":
            rows.append(payload[0])
        elif kind == "checksum":
            checksums[payload[0]] = payload[1]
        else:
            metrics = payload[0]
    for proc in procs:
        proc.join(30)
    sizes = {}
    for row in rows:
        raw, streamed, per_layer = row["raw"], row["streamed"], row["per_layer"]
        sizes[str(row["tokens"])] = {
            "tokens": row["tokens"], "bytes": row["bytes"],
            "gbps": streamed["gbps"], "ms": streamed["ms"],
            "nccl_raw_gbps": raw["gbps"], "nccl_raw_ms": raw["ms"],
            "fraction_of_nccl": streamed["gbps"] / raw["gbps"],
            "per_layer_gbps": per_layer["gbps"], "per_layer_ms": per_layer["ms"],
            "per_layer_fraction_of_nccl": per_layer["gbps"] / raw["gbps"],
            "bit_exact_checksum": checksums.get(row["tokens"]) == row["received_checksum"],
        }
    return {"device": _device_name(args), "backend": "nccl" if args.device == "cuda" else "gloo",
            "args": asdict(args), "sizes": sizes, "receiver_metrics": metrics}


def markdown(result: dict) -> str:
    lines = [f"# KV transfer on {result['device']} ({result['backend']})", "",
             f"{result['args']['layers']} layers, {result['args']['kv_heads']} KV heads, head dim "
             f"{result['args']['head_dim']}, block {result['args']['block_size']}, "
             f"{result['args']['dtype']}; median of {result['args']['iters']} runs.", "",
             "| tokens | MiB | streamed GB/s | ms | per-layer GB/s | raw GB/s | raw ms | streamed / raw | checksum ok |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |"]
    for s in result["sizes"].values():
        lines.append(f"| {s['tokens']} | {s['bytes'] / (1 << 20):.1f} | {s['gbps']:.1f} | {s['ms']:.3f} | "
                     f"{s['per_layer_gbps']:.1f} | {s['nccl_raw_gbps']:.1f} | {s['nccl_raw_ms']:.3f} | "
                     f"{s['fraction_of_nccl']:.0%} | {'yes' if s['bit_exact_checksum'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> tuple[BenchArgs, Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tokens", default="512,4096,32768", help="comma-separated request sizes")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-message-mb", type=float, default=64.0,
                   help="coalescing threshold of the 'streamed' variant (per_layer uses 0)")
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--out", type=Path, required=True, help="directory for the JSON and markdown")
    ns = p.parse_args(argv)
    tokens = tuple(int(t) for t in ns.tokens.split(","))
    if any(t <= 0 or t % ns.block_size for t in tokens):
        p.error(f"--tokens must be positive multiples of --block-size ({ns.block_size})")
    if ns.iters < 1 or ns.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    if ns.device == "cuda":
        import torch

        if torch.cuda.device_count() < 2:
            p.error("--device cuda needs 2 GPUs on this host (use --device cpu to check the script)")
    args = BenchArgs(ns.device, tokens, ns.layers, ns.kv_heads, ns.head_dim, ns.block_size,
                     ns.dtype, ns.iters, ns.warmup, ns.min_message_mb, ns.timeout_s)
    return args, ns.out


def main(argv=None) -> int:
    args, out = parse_args(argv)
    result = run(args)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"kvtransfer_{result['device']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / f"{stem}.md").write_text(table)
    print(table)
    print(f"wrote {out / stem}.json and .md")
    return 0 if all(s["bit_exact_checksum"] for s in result["sizes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
