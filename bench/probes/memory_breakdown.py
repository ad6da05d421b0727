"""Where the device's memory goes when the engine starts: its memory plan (engine/memory_plan.py:
weights, context and workspaces, profiled activation peak, CUDA-graph reserve, the KV pool) and
what is really in use once the graphs are captured, for the Llama-3-8B shape with random weights
(made on the device as they load: nothing else resident).

    python bench/probes/memory_breakdown.py --device cuda [--kv-cache-dtype fp8] [--old-load-check] --out DIR
    python bench/probes/memory_breakdown.py --device cpu   # smoke run: a tiny model, no plan on a CPU

`--old-load-check` first materialises the model the way the engine did before (float32 on the
device, then cast to bf16) and reports what the caching allocator kept: the memory the old
planning counted as in use.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

GIB = 1024**3


def old_load_check(folder: Path, device: str) -> dict:
    """Allocated / reserved / in use after the old float32-then-bf16 materialisation."""
    import transformers

    from tandem.engine.models import model_class_for

    config = transformers.AutoConfig.from_pretrained(folder)
    torch.cuda.empty_cache()
    free0, total = torch.cuda.mem_get_info(device)
    with torch.device("meta"):
        model = model_class_for(config)(config)
    model = model.to_empty(device=device).to(torch.bfloat16)
    torch.cuda.synchronize(device)
    free1, _ = torch.cuda.mem_get_info(device)
    found = dict(weights_gib=sum(p.numel() * p.element_size() for p in model.parameters()) / GIB,
                 allocated_gib=torch.cuda.memory_allocated(device) / GIB,
                 reserved_gib=torch.cuda.memory_reserved(device) / GIB, in_use_gib=(free0 - free1) / GIB)
    del model
    torch.cuda.empty_cache()
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--old-load-check", action="store_true")
    ap.add_argument("--out", default=None, help="folder for memory_breakdown_<kv>.json")
    args = ap.parse_args(argv)
    from tandem import LLM
    from tandem.bench.engine_bench import CONFIG_8B
    from tandem.bench.random_weights import random_model_folder, random_weights

    gpu = args.device.startswith("cuda")
    tmp = Path(tempfile.mkdtemp(prefix="tandem-mem-"))
    if gpu:
        folder = random_model_folder(tmp / "llama3-8b-random", CONFIG_8B)
    else:
        from tandem.engine.make_model import make_model

        folder = make_model(tmp / "tiny-llama", "llama", seed=0)
    report: dict = {"device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
                    "command": "python bench/probes/memory_breakdown.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if gpu and args.old_load_check:
        report["old_load"] = old_load_check(folder, args.device)
        print("old load (float32 on the device, then bf16): " + ", ".join(
            f"{k} {v:.2f}" for k, v in report["old_load"].items()), flush=True)
    dtype = torch.bfloat16 if gpu else torch.float32
    llm = LLM(str(folder), device=args.device, dtype=str(dtype).removeprefix("torch."),
              weights=random_weights(folder, args.device, dtype), kv_cache_dtype=args.kv_cache_dtype,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
              max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization)
    runner = llm.engine.runner
    report["num_kv_blocks"] = runner.num_kv_blocks
    report["kv_pool_gib"] = runner.kv_cache.numel() * runner.kv_cache.element_size() / GIB
    plan = runner.memory_plan
    if plan is None:
        print(f"no memory plan on {args.device}: the pool is cpu_kv_cache_gb ({report['kv_pool_gib']:.3f} GiB, "
              f"{runner.num_kv_blocks} blocks)")
    else:
        report["plan"] = plan.as_dict()
        print(plan.describe())
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        report["after_start"] = dict(in_use_gib=(total - free) / GIB, allocated_gib=torch.cuda.memory_allocated() / GIB,
                                     reserved_gib=torch.cuda.memory_reserved() / GIB,
                                     budget_gib=plan.budget_bytes / GIB)
        a = report["after_start"]
        print(f"after start-up (graphs captured): in use {a['in_use_gib']:.2f} GiB of the {a['budget_gib']:.2f} GiB "
              f"budget; torch allocated {a['allocated_gib']:.2f}, reserved {a['reserved_gib']:.2f} GiB "
              f"(the graphs' pool and the warm-up's cached blocks are the difference to weights + pool)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"memory_breakdown_{args.kv_cache_dtype}.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
