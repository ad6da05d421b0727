"""The model runner of one expert-parallel rank: its MoE model holds only this rank's experts, and
the engine syncs every step with the group through it (`engine.expert_parallel`'s docstring).
Apart from `expert_parallel` (which the MoE model imports) so the models never import a runner."""
from __future__ import annotations

import torch

from tandem.engine.expert_parallel import ExpertParallelGroup
from tandem.engine.model_runner import ModelRunner


class ExpertParallelModelRunner(ModelRunner):
    """A `ModelRunner` whose MoE model holds only this rank's experts.

    Loading is the base runner's; only the model's construction differs (it gets the group).
    It is `collective`: the engine syncs each step with the group through it (module docstring)."""

    collective = True

    def __init__(self, config, hf_config, weights=None, *, ep: ExpertParallelGroup) -> None:
        self.ep = ep
        super().__init__(config, hf_config, weights)

    def _build_model(self, cls) -> torch.nn.Module:
        return cls(self.hf_config, ep=self.ep)

    def sync_step(self, has_requests: bool, num_tokens: int) -> tuple[bool, int]:
        return self.ep.agree_on_step(has_requests, num_tokens)

    @torch.inference_mode()
    def execute_idle(self) -> None:
        """A forward of one padding token, so this rank takes part in the other ranks' MoE
        all-to-alls. Its slot is -1 (its K/V is written nowhere); it reads cache block 0."""
        from tandem.engine.attention import ForwardContext

        dev = self.device
        ctx = ForwardContext(
            slot_mapping=torch.full((1,), -1, dtype=torch.int64, device=dev),
            block_tables=torch.zeros((1, 1), dtype=torch.int32, device=dev),
            context_lens=torch.ones(1, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32, device=dev),
            is_decode=False,
            kv_cache=self.kv_cache,
        )
        load = getattr(self.model, "expert_load", None)
        if load is not None:
            load.paused = True
        try:
            self.model(torch.zeros(1, dtype=torch.int64, device=dev), torch.zeros(1, dtype=torch.int64, device=dev),
                       ctx)
        finally:
            if load is not None:
                load.paused = False
