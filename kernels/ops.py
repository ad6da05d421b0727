"""One seam between the engine and the kernels: each op runs the Triton kernel on CUDA tensors
and the plain-torch reference elsewhere (CPU). Set TANDEM_TRITON_ON_CPU=1 together with
TRITON_INTERPRET=1 to push CPU tensors through the Triton kernels (tests do this)."""
from __future__ import annotations

from kernels.activation import silu_and_mul_ref
from kernels.block_copy import gather_blocks_ref, scatter_blocks_ref
from kernels.paged_attention import paged_decode_attention_ref, paged_prefill_attention_ref
from kernels.rmsnorm import fused_add_rms_norm_ref, rms_norm_ref
from kernels.rope import rope_ref
from kernels.write_kv import write_kv_ref

# Reference-only until the Triton kernels land; the signatures are the contract.
write_kv = write_kv_ref
paged_decode_attention = paged_decode_attention_ref
paged_prefill_attention = paged_prefill_attention_ref
gather_blocks = gather_blocks_ref
scatter_blocks = scatter_blocks_ref
rms_norm = rms_norm_ref
fused_add_rms_norm = fused_add_rms_norm_ref
rope = rope_ref
silu_and_mul = silu_and_mul_ref
