"""The engine's one frozen configuration object, built once and handed to each component."""
from __future__ import annotations

from dataclasses import dataclass

SCHEDULING_POLICIES = ("fcfs", "lof")
# EngineConfig.kv_cache_dtype: "auto" (the model dtype), or FP8 e4m3 under vLLM's two spellings.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper and newer convert e4m3 in hardware
QUANTIZATIONS = ("fp8",)


def check_device(device: str) -> None:
    """ValueError, saying why, unless torch can run on `device` here ("cpu", "cuda", "cuda:N")."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device {device!r}: {why} (torch {torch.__version__}); use device cpu")


def check_kv_cache_dtype(kv_cache_dtype: str, device: str) -> None:
    """ValueError, saying why, unless this KV cache dtype can run on `device`."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        hint = " (only e4m3 FP8 is supported)" if kv_cache_dtype.startswith("fp8") else ""
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}{hint}; use one of {KV_CACHE_DTYPES}")
    import torch

    if kv_cache_dtype == "auto" or torch.device(device).type != "cuda":
        return  # the CPU runs the plain-torch reference path, which converts in software
    gpu = torch.device(device)
    why = fp8_kv_unsupported_reason(torch.cuda.get_device_capability(gpu), torch.cuda.get_device_name(gpu))
    if why:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: {why}. Use kv_cache_dtype='auto'.")


def fp8_kv_unsupported_reason(capability: tuple[int, int], gpu_name: str) -> str | None:
    """Why a GPU of this compute capability cannot hold an FP8 KV cache, or None if it can."""
    if tuple(capability) >= FP8_MIN_CAPABILITY:
        return None
    want = ".".join(map(str, FP8_MIN_CAPABILITY))
    return (f"an FP8 KV cache needs a GPU with FP8 support (compute capability >= {want}: Ada, Hopper or "
            f"newer); {gpu_name} has {capability[0]}.{capability[1]}")


@dataclass(frozen=True)
class EngineConfig:
    model: str
    device: str = "cpu"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    # What the KV cache stores: "auto" (the model dtype) or "fp8" (e4m3 with per-layer K/V scales,
    # half the bytes of bf16, so twice the tokens in the same pool; engine/kv_quant.py).
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from memory (cpu_kv_cache_gb or gpu_memory_utilization)
    cpu_kv_cache_gb: float = 0.5  # the KV pool itself when the device is the CPU (not the host tier)
    # The host tier of the prefix cache (engine/host_tier.py): GiB of host memory (pinned, on a
    # GPU) that full prefix blocks spill to before the device pool evicts them, copied back on a
    # hit instead of recomputed. 0: off. Off by default: pinned host memory is taken from every
    # process on the machine, and how much a host can spare depends on how many replicas share it.
    # On a CPU device it is a second pool of CPU tensors.
    host_kv_cache_gb: float = 0.0
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # per-step token budget (chunked prefill)
    # Order of the waiting queue: "fcfs" (arrival order), or "lof" (longest requested output
    # first, SGLang's policy of that name), for offline batches that end with their longest
    # request. On the H100 benchmark's workload, lof with a 256-token budget gave 4021 output
    # tok/s against 2947 for fcfs at 256 and 3187 for fcfs at 8192 (bench/results/engine_*.md):
    # the longest request starts first and the prompt work rides along its decode steps.
    # Preempted sequences return to the front under both.
    scheduling_policy: str = "fcfs"
    # > 0: one sequence computes at most this many tokens per step (vLLM's setting of this name),
    # so a long prompt's chunks leave part of the budget to shorter prompts that arrive meanwhile
    # (e.g. a chat follow-up behind another conversation's long document). 0: no cap.
    long_prefill_token_threshold: int = 0
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # True: no CUDA graphs
    # Overlap scheduling: schedule and launch step N+1 before reading step N's sampled tokens,
    # so the host's per-step work runs while the GPU computes (engine/llm_engine.py).
    async_scheduling: bool = True
    seed: int = 0
    # "fp8": e4m3 weights for the decoder's linear layers, quantized while loading a bf16/fp32
    # checkpoint (per-channel weight scales, per-token activation scales). None: the checkpoint's
    # own format (an FP8 checkpoint, one whose config.json has an fp8 quantization_config, loads
    # as FP8 either way). engine/fp8.py.
    quantization: str | None = None

    def __post_init__(self) -> None:
        check_device(self.device)
        check_kv_cache_dtype(self.kv_cache_dtype, self.device)
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unsupported quantization {self.quantization!r}; supported: {QUANTIZATIONS}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0 (0: no cap)")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {self.scheduling_policy!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if self.host_kv_cache_gb < 0:
            raise ValueError("host_kv_cache_gb must be >= 0 (0: no host tier)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")

    @property
    def torch_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        try:
            return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                    "float64": torch.float64}[self.dtype]
        except KeyError:
            raise ValueError(f"unsupported dtype {self.dtype!r}") from None

    @property
    def kv_cache_torch_dtype(self):
        from tandem.engine.kv_quant import kv_cache_torch_dtype

        return kv_cache_torch_dtype(self.kv_cache_dtype, self.torch_dtype)
