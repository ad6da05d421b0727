"""Grammar masks on the step's logits: rows of a packed token bitmask applied in place to the
logits rows of the constrained sequences, in one launch for the whole step.

`bitmask` is [k, words] int32 with words >= ceil(vocab / 32), xgrammar's layout: bit `t % 32` of
word `t // 32` set means token t is allowed. `rows` is [k] int64: bitmask row i masks logits row
`rows[i]`. A disallowed token's logit becomes -inf; rows not named are not touched, so only the
constrained rows of a batch pay (and a batch without any launches nothing).
"""
import torch
import triton
import triton.language as tl


def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: logits[rows[i], t] = -inf where bit t of bitmask[i] is clear."""
    if rows.numel() == 0:
        return
    vocab = logits.shape[-1]
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab].bool()
    picked = logits.index_select(0, rows).masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, rows, picked)


@triton.jit
def _apply_token_bitmask_kernel(logits_ptr, bitmask_ptr, rows_ptr, vocab, stride_logits, stride_bitmask,
                                BLOCK: tl.constexpr):
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = offs < vocab
    # Each word is read by the 32 lanes of its tokens (one cache line serves 512 tokens).
    words = tl.load(bitmask_ptr + i.to(tl.int64) * stride_bitmask + offs // 32, mask=in_vocab, other=-1)
    allowed = (words >> (offs % 32)) & 1
    minus_inf = tl.full([BLOCK], float("-inf"), dtype=logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + row * stride_logits + offs, minus_inf, mask=in_vocab & (allowed == 0))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Triton version of `apply_token_bitmask_ref` (logits [batch, vocab], last dim contiguous)."""
    if rows.numel() == 0:
        return
    assert logits.stride(-1) == 1 and bitmask.stride(-1) == 1 and bitmask.dtype == torch.int32
    assert bitmask.shape[0] == rows.shape[0] and bitmask.shape[1] * 32 >= logits.shape[1]
    vocab = logits.shape[1]
    block = min(4096, triton.next_power_of_2(vocab))
    _apply_token_bitmask_kernel[(rows.shape[0], triton.cdiv(vocab, block))](
        logits, bitmask, rows, vocab, logits.stride(0), bitmask.stride(0), BLOCK=block, num_warps=4,
    )
