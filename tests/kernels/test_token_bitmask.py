"""The grammar-mask kernel (Triton) against its plain-torch reference, and both against the
bit layout xgrammar fills (bit t % 32 of word t // 32 set = token t allowed)."""
import pytest
import torch

from tests.kernels.kernel_testing import device
from tandem.kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_ref


def _random_bitmask(k: int, vocab: int, words: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed bitmask and the boolean [k, vocab] it encodes."""
    words = words or -(-vocab // 32)
    allowed = torch.rand(k, words * 32) < 0.3
    weights = (1 << torch.arange(32, dtype=torch.int64))
    packed = (allowed.view(k, words, 32).to(torch.int64) * weights).sum(-1)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)  # as int32 bits
    return packed, allowed[:, :vocab]


def _expected(logits: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    out = logits.clone()
    for i, row in enumerate(rows.tolist()):
        out[row][~allowed[i]] = float("-inf")
    return out


@pytest.mark.parametrize("batch, vocab, rows, dtype", [
    (4, 100, [2, 0], torch.float32),          # vocab not a multiple of 32
    (6, 639, [5, 1, 3], torch.float16),       # the test models' vocabulary
    (3, 5000, [0, 1, 2], torch.float32),      # more than one block per row
    (2, 64, [], torch.float32),               # no constrained row: nothing changes
])
def test_kernel_and_reference_match_the_bit_layout(batch, vocab, rows, dtype):
    dev = device()
    logits = torch.randn(batch, vocab).to(dtype)
    packed, allowed = _random_bitmask(len(rows), vocab)
    rows_t = torch.tensor(rows, dtype=torch.int64)
    expected = _expected(logits, rows_t, allowed)

    ref = logits.clone()
    apply_token_bitmask_ref(ref, packed, rows_t)
    assert torch.equal(ref, expected)

    out = logits.to(dev)
    apply_token_bitmask(out, packed.to(dev), rows_t.to(dev))
    assert torch.equal(out.cpu(), expected)


def test_wider_bitmask_than_vocab_and_strided_logits():
    """A bitmask allocated for a padded vocabulary, and logits that are a row slice of a bigger
    tensor (the sampler's rows)."""
    dev = device()
    big = torch.randn(8, 70)
    logits = big[2:6]
    packed, allowed = _random_bitmask(2, 70, words=4)
    rows = torch.tensor([3, 0])
    expected = _expected(logits, rows, allowed)
    out = big.to(dev)[2:6]
    apply_token_bitmask(out, packed.to(dev), rows.to(dev))
    assert torch.equal(out.cpu(), expected)


def test_matches_xgrammar_filled_masks(llama_dir):
    """Masks filled by a real xgrammar matcher: exactly the tokens the matcher accepts survive."""
    xgr = pytest.importorskip("xgrammar")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    vocab = len(tokenizer)
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    grammar = xgr.GrammarCompiler(info).compile_regex(r"(yes|no)")
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    xgr.GrammarMatcher(grammar).fill_next_token_bitmask(bitmask)
    logits = torch.zeros(2, vocab)
    apply_token_bitmask(logits.to(device()), bitmask.to(device()), torch.tensor([1], device=device()))
    apply_token_bitmask_ref(logits, bitmask, torch.tensor([1]))
    survivors = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert survivors and torch.isfinite(logits[0]).all()
    for token in range(vocab):
        accepted = xgr.GrammarMatcher(grammar).accept_token(token)
        assert accepted == (token in survivors), tokenizer.decode([token])


@pytest.mark.gpu
def test_llama3_vocab_256_rows_gpu():
    logits = torch.randn(256, 128256, device="cuda", dtype=torch.bfloat16)
    packed, _ = _random_bitmask(200, 128256)  # one mask per masked row
    rows = torch.randperm(256)[:200].cuda()
    ref = logits.clone()
    apply_token_bitmask_ref(ref, packed.cuda(), rows)
    apply_token_bitmask(logits, packed.cuda(), rows)
    assert torch.equal(logits, ref)
