"""Logits straight from a model's forward pass (one packed prefill with a fresh paged KV cache),
for tests that compare two models' functions rather than their sampled tokens (on the model's
device, returned on the CPU)."""
from __future__ import annotations

import torch

from tandem.engine.attention import ForwardContext
from tandem.engine.models.llama import head_dim_of


def prefill_logits(model, prompts: list[list[int]], every_position: bool = False) -> torch.Tensor:
    """float32 logits of each prompt's last token [len(prompts), vocab], or with `every_position`
    of every prompt token, packed [sum of lengths, vocab]."""
    cfg, block_size = model.config, 16
    dev = model.embed_tokens.weight.device
    blocks = [-(-len(p) // block_size) for p in prompts]
    kv_cache = torch.zeros(cfg.num_hidden_layers, 2, sum(blocks), block_size, cfg.num_key_value_heads,
                           head_dim_of(cfg), dtype=model.embed_tokens.weight.dtype, device=dev)
    tables = torch.zeros(len(prompts), max(blocks), dtype=torch.int32)
    slots, positions, first = [], [], 0
    for i, (prompt, n) in enumerate(zip(prompts, blocks)):
        tables[i, :n] = torch.arange(first, first + n)
        slots += [first * block_size + pos for pos in range(len(prompt))]
        positions += list(range(len(prompt)))
        first += n
    lens = torch.tensor([len(p) for p in prompts])
    ctx = ForwardContext(slot_mapping=torch.tensor(slots, device=dev), block_tables=tables.to(dev),
                         context_lens=lens.to(torch.int32).to(dev),
                         cu_seqlens_q=torch.cat([torch.zeros(1), lens.cumsum(0)]).to(torch.int32).to(dev),
                         is_decode=False, kv_cache=kv_cache)
    with torch.inference_mode():
        hidden = model(torch.tensor([t for p in prompts for t in p], device=dev), torch.tensor(positions, device=dev),
                       ctx)
        rows = hidden if every_position else hidden[(lens.cumsum(0) - 1).to(dev)]
        return model.compute_logits(rows).float().cpu()
