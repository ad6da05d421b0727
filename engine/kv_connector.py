"""The engine's one port for KV cache that is computed in another worker (disaggregation).

A `KVConnector` is handed to `LLMEngine`'s constructor; the engine calls it at fixed points and
the connector owns every remote transfer's state (one owner per remote prefill on each side).
As in vLLM's v1 connector, there are two halves, each called on the engine thread:

- load (decode role): the scheduler asks `wants_load` for a waiting sequence whose uncached
  prompt suffix it could hand off; if so it allocates blocks for the whole prompt and calls
  `start_load`, and the sequence waits for KV, off the batch. `finished_loads` hands back the
  loads that resolved: KV landed (with the first token, sampled where the prompt ran) or failed
  (the engine recomputes the rest of the prompt locally). `cancel_load` is called before the
  blocks of a cancelled sequence are freed: no KV may land in them after it returns.
- save (prefill role): for a scheduled chunk that completes a sequence's prompt, `wants_save`
  says the sequence's KV goes elsewhere; the engine calls `start_save` before the step's forward
  pass, then `layer_computed(i)` as soon as layer i of that forward has been issued (so the
  transfer of early layers overlaps the later layers' compute), and `step_computed` after the
  last layer. The sequence then stops after its first sampled token, its blocks held until
  `save_done`; `cancel_save` drops a save whose request went away.

The scheduler knows only "this sequence waits for KV"; nothing here names a process, a peer
or a transport. `workers.disagg` implements both halves over `kvtransfer`; tests use
`tests/engine/fake_connector.py` (two in-process engines).
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.engine.sequence import Sequence
from tandem.protocol.logprob import Logprob


@dataclass(frozen=True)
class LoadResult:
    """How a load ended. `ok`: the whole prompt's KV is in the sequence's blocks and
    `first_token` is its first output token; else `reason` says why (the rest is recomputed)."""

    ok: bool
    first_token: int | None = None
    logprobs: dict[int, Logprob] | None = None
    reason: str = ""


class KVConnector:
    """A connector that neither loads nor saves; roles override their half."""

    def bind(self, kv_cache: torch.Tensor, block_size: int, wakeup: threading.Event,
             kv_scales: Sequence[float] = ()) -> None:
        """Called once by the engine, when its KV cache [layers, 2, blocks, block_size, heads,
        head_dim] exists and before its first step. `wakeup` is set by the connector when a
        transfer resolves, so an engine with nothing but transfers in flight sleeps on it.
        `kv_scales`: an FP8 cache's per-layer scales, k0, v0, k1, v1, ... (empty otherwise):
        KV from a worker with other scales must not land here."""

    def use_tensor_parallel(self, runner) -> None:
        """Called after `bind` when the engine is rank 0 of a tensor-parallel group (`runner`, a
        `TensorParallelModelRunner`): the other ranks' caches hold the other KV heads."""
        raise ValueError(f"{type(self).__name__} does not move KV with tensor parallelism")

    # ------------------------------------------------------------------------------- load
    @property
    def loads(self) -> bool:
        """Whether this connector may load: only then is it asked about waiting sequences (each
        ask costs a prefix match)."""
        return False

    def wants_load(self, seq: Sequence, num_uncached_tokens: int) -> bool:
        return False

    def start_load(self, seq: Sequence) -> None:
        raise NotImplementedError

    def cancel_load(self, seq: Sequence) -> None:
        raise NotImplementedError

    def finished_loads(self) -> list[tuple[Sequence, LoadResult]]:
        return []

    # ------------------------------------------------------------------------------- save
    @property
    def saves(self) -> bool:
        """Whether this connector may save: the engine then reads every step's tokens before
        scheduling the next one (a saved sequence stops after its first token)."""
        return False

    def wants_save(self, seq: Sequence) -> bool:
        return False

    def start_save(self, seq: Sequence) -> None:
        raise NotImplementedError

    def layer_computed(self, layer: int) -> None:
        """Layer `layer` of the step's forward has been issued (on the GPU: queued on the
        current stream, after which an event marks it; on the CPU: computed)."""

    def step_computed(self) -> None:
        """The step's forward has been issued to its last layer."""

    def save_done(self, seq: Sequence) -> bool:
        raise NotImplementedError

    def cancel_save(self, seq: Sequence) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release transports (engine shutdown)."""
