"""The sampler's two-stage greedy argmax must pick exactly what `argmax` picks: the first
maximum, through ties inside and across chunks, -inf and NaN entries, and vocabularies that
do not divide into the chunks."""
from __future__ import annotations

import pytest
import torch

from tandem.engine.sampler import greedy_argmax


def _check(logits: torch.Tensor) -> None:
    torch.testing.assert_close(greedy_argmax(logits, split=True), logits.argmax(dim=-1), rtol=0, atol=0)


@pytest.mark.parametrize("vocab", [1024, 1031, 32000, 128256])
def test_random_rows(vocab):
    gen = torch.Generator().manual_seed(vocab)
    _check(torch.randn(5, vocab, generator=gen))


def test_ties_resolve_to_the_first_index():
    logits = torch.randn(4, 4096, generator=torch.Generator().manual_seed(0))
    logits[0, [7, 3000]] = 50.0  # across chunks
    logits[1, [100, 101]] = 50.0  # inside one chunk
    logits[2] = 1.0  # the whole row tied
    logits[3, [4095, 16]] = 50.0
    _check(logits)
    assert greedy_argmax(logits, split=True).tolist()[:4] == [7, 100, 0, 16]


def test_inf_and_nan_rows():
    logits = torch.randn(4, 2053, generator=torch.Generator().manual_seed(1))
    logits[0] = float("-inf")  # nothing allowed: index 0, as argmax
    logits[1, 2052] = float("inf")  # in the padded last chunk
    logits[2, 999] = float("nan")  # NaN counts as the maximum in both
    logits[3, :1000] = float("-inf")
    _check(logits)


@pytest.mark.gpu
def test_gpu_default_path_matches_argmax():
    logits = torch.randn(3, 128256, device="cuda")
    logits[1, [5, 70000]] = 40.0
    torch.testing.assert_close(greedy_argmax(logits), logits.argmax(dim=-1), rtol=0, atol=0)
