"""A random-weight model for benchmarks that load nothing but Tandem: a folder with the config and
a tokenizer, and the weights made one tensor at a time on the device as the engine loads them,
so no HF model (and no second copy of the weights) is resident while Tandem plans its memory."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch


def random_model_folder(folder: Path, config_path: Path) -> Path:
    """`folder` with `config_path`'s config and the test tokenizer (no weights)."""
    import transformers

    from tandem.engine.make_model import build_tokenizer

    config = transformers.AutoConfig.from_pretrained(config_path)
    config.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def random_weights(folder: Path, device: str, dtype: torch.dtype, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every weight of the folder's model: matrices N(0, initializer_range),
    vectors (norm weights) ones, as HF initialises them; names and shapes from the HF model built
    on the meta device. Each tensor is made on `device` just before the loader copies it."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    std = getattr(config, "initializer_range", 0.02)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, meta in skeleton.state_dict().items():
        if "rotary_emb" in name:
            continue
        if meta.dim() == 1:
            yield name, torch.ones(meta.shape, dtype=dtype, device=device)
        else:
            yield name, torch.empty(meta.shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)
