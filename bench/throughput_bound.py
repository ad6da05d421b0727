"""A lower bound on the time of the offline throughput run, from the workload and the rates a run
measured: what no engine that computes the same tokens in the model's dtype can beat on that device.

Two bounds, and the run can go no faster than the larger:
- bytes: the longest request needs one step per output token (each token is the next step's
  input), and every step reads all weights but the embedding table (one row each). Every decode
  token reads its whole context's K and V. Over the copy bandwidth measured in the run. Nothing
  else is counted (prompt chunks re-reading earlier chunks' KV, activations, KV writes), so this
  is below what any engine reads;
- FLOPs: every computed token's matmuls (the lm_head only for rows that sample a token) plus
  attention (causal over each prompt, the whole context for each decode token), over the matmul
  rate measured in the run.

Both read the same tokens: the per-request sums equal what `bench/step_trace.py` records for a
run without preemption (the tests check that). One token per request per step is assumed: no
speculative decoding, which trades more work per step for fewer steps.

The number of steps is at least the longest request's output, and, given the engine's limits
(`WorkloadCounts.of(..., max_num_seqs=, kv_pool_tokens=, block_size=)`), at least the decode
tokens over `max_num_seqs` (a step decodes at most that many sequences) and at least the KV the
decode tokens hold over the pool (a decode token of a sequence with context c holds c tokens'
blocks in that step; one step's sequences together hold at most the pool): the KV-capacity
limit on concurrency, which is what an FP8 cache's twice-as-large pool relaxes. Weights and KV
may have different element sizes (`ModelShape.kv_dtype_bytes`: an FP8 cache under bf16 weights).

    python -m tandem.bench.throughput_bound bench/results/engine_nvidia_h100_80gb_hbm3.json

recomputes the bound of a committed run from its workload parameters, its measured rates and the
model config, and prints it; `--write` stores it in that JSON as `throughput_bound`.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    """What the bound needs of a dense decoder: its sizes and the bytes of one element."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype_bytes: int  # of a weight element
    kv_dtype_bytes: int | None = None  # of a KV cache element (None: as the weights)

    @classmethod
    def from_config(cls, cfg: dict, dtype_bytes: int, kv_dtype_bytes: int | None = None) -> "ModelShape":
        heads = cfg["num_attention_heads"]
        return cls(layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], heads=heads,
                   kv_heads=cfg.get("num_key_value_heads", heads),
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   intermediate=cfg["intermediate_size"], vocab=cfg["vocab_size"], dtype_bytes=dtype_bytes,
                   kv_dtype_bytes=kv_dtype_bytes)

    @property
    def layer_matmul_params(self) -> int:
        """qkv + o + gate/up + down of one layer (no biases: Llama)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.intermediate

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def step_weight_bytes(self) -> int:
        """Bytes every step reads: all layers' matmuls, the norms and the lm_head."""
        norms = (2 * self.layers + 1) * self.hidden
        return (self.layers * self.layer_matmul_params + self.lm_head_params + norms) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * (self.kv_dtype_bytes or self.dtype_bytes)


@dataclass(frozen=True)
class WorkloadCounts:
    """The per-request sums the bound reads, for a workload run without prefix hits or preemption."""

    min_steps: int  # the longest request's output length, or more under the engine's limits (below)
    computed_tokens: int  # every prompt token plus every output token but each request's last
    decode_tokens: int  # output tokens computed in one-token steps (all but each request's first)
    decode_context: int  # sum over decode tokens of the context they attend to (themselves included)
    prompt_attention_pairs: int  # sum over prompts of the causal (query, key) pairs: P (P + 1) / 2
    sampled_rows: int  # rows that go through the lm_head: one per output token
    # What set min_steps: "longest request", "max_num_seqs" or "kv capacity" (module docstring).
    min_steps_by: str = "longest request"
    max_num_seqs: int | None = None
    kv_pool_tokens: int | None = None

    @classmethod
    def of(cls, prompt_lens: list[int], outs: list[int], max_num_seqs: int | None = None,
           kv_pool_tokens: int | None = None, block_size: int = 1) -> "WorkloadCounts":
        if len(prompt_lens) != len(outs) or not outs or min(outs) < 1 or min(prompt_lens) < 1:
            raise ValueError("one prompt length and one output length (both >= 1) per request")
        if (max_num_seqs is not None and max_num_seqs < 1) or (kv_pool_tokens is not None and kv_pool_tokens < 1):
            raise ValueError("max_num_seqs and kv_pool_tokens must be >= 1")
        # Decode token j (1..O-1) of a request with prompt P sees P + j positions.
        decode_tokens = sum(o - 1 for o in outs)
        steps = {"longest request": max(outs)}
        if max_num_seqs is not None:
            steps["max_num_seqs"] = -(-decode_tokens // max_num_seqs)
        if kv_pool_tokens is not None:
            held = sum(-(-(p + j) // block_size) * block_size for p, o in zip(prompt_lens, outs) for j in range(1, o))
            steps["kv capacity"] = -(-held // kv_pool_tokens)
        by = max(steps, key=lambda k: steps[k])
        return cls(
            min_steps=steps[by],
            computed_tokens=sum(p + o - 1 for p, o in zip(prompt_lens, outs)),
            decode_tokens=decode_tokens,
            decode_context=sum((o - 1) * p + o * (o - 1) // 2 for p, o in zip(prompt_lens, outs)),
            prompt_attention_pairs=sum(p * (p + 1) // 2 for p in prompt_lens),
            sampled_rows=sum(outs),
            min_steps_by=by, max_num_seqs=max_num_seqs, kv_pool_tokens=kv_pool_tokens,
        )


def throughput_bound(shape: ModelShape, work: WorkloadCounts, copy_gb_s: float, matmul_tflops: float) -> dict:
    """The two bounds in seconds, the larger one, and the output tok/s it allows."""
    bytes_read = work.min_steps * shape.step_weight_bytes + work.decode_context * shape.kv_bytes_per_token
    bytes_s = bytes_read / (copy_gb_s * 1e9)
    # QK^T and PV: 2 matmuls x 2 FLOPs per (query head, key position, dim).
    attn_pairs = work.prompt_attention_pairs + work.decode_context
    flops = (2 * shape.layers * shape.layer_matmul_params * work.computed_tokens
             + 2 * shape.lm_head_params * work.sampled_rows
             + 4 * shape.layers * shape.heads * shape.head_dim * attn_pairs)
    flops_s = flops / (matmul_tflops * 1e12)
    bound_s = max(bytes_s, flops_s)
    return dict(bytes_s=bytes_s, flops_s=flops_s, bound_s=bound_s, bound_by="bytes" if bytes_s >= flops_s else "flops",
                bytes_read=bytes_read, flops=flops, output_tok_s=work.sampled_rows / bound_s,
                copy_gb_s=copy_gb_s, matmul_tflops=matmul_tflops, counts=asdict(work))


def run_figures(bound: dict, tandem_tok_s: float, hf_static_tok_s: float | None, target: float = 50.0) -> dict:
    """How a run stands against its bound: the fraction of the bound it reached, the ratio to HF
    static the bound itself would give, and the fraction of the bound `target`x HF static needs."""
    out = dict(bound, fraction=tandem_tok_s / bound["output_tok_s"])
    if hf_static_tok_s:
        out["vs_hf_static_at_bound"] = bound["output_tok_s"] / hf_static_tok_s
        out[f"fraction_needed_for_{target:g}x_hf_static"] = target * hf_static_tok_s / bound["output_tok_s"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="an engine_<device>.json written by bench/engine_bench.py on a GPU")
    ap.add_argument("--config", type=Path, default=Path(__file__).parent / "configs" / "llama3_8b.json",
                    help="the model config the run used (the GPU runs use this one)")
    ap.add_argument("--dtype-bytes", type=int, default=2, help="2 for the GPU runs' bf16")
    ap.add_argument("--write", action="store_true", help="store the figures in the results JSON")
    args = ap.parse_args()
    from tandem.bench.workload import make_workload

    res = json.loads(args.results.read_text())
    cfg = json.loads(args.config.read_text())
    w = res["workload"]
    prompts, outs = make_workload(w["num_requests"], *w["prompt_len"], w["output_mean"], w["output_cap"], cfg["vocab_size"])
    lens = [len(p) for p in prompts]
    if (sum(lens), sum(outs)) != (w["prompt_tokens"], w["output_tokens"]):
        raise SystemExit(f"{args.results}: the regenerated workload ({sum(lens)} prompt, {sum(outs)} output tokens) "
                         f"is not the run's ({w['prompt_tokens']}, {w['output_tokens']})")
    bound = throughput_bound(ModelShape.from_config(cfg, args.dtype_bytes), WorkloadCounts.of(lens, outs),
                             res["copy_bandwidth_gb_s"], res["matmul_tflops"])
    figures = run_figures(bound, res["throughput_tok_s"]["tandem"], res["throughput_tok_s"].get("hf_static"))
    figures["computed_by"] = f"python -m tandem.bench.throughput_bound {args.results}"
    print(json.dumps(figures, indent=2))
    if args.write:
        res["throughput_bound"] = figures
        args.results.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
