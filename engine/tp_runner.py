"""The model runner of one tensor-parallel rank, and the lockstep channel between the ranks.

Rank 0 (the leader) is the runner of the replica's one engine: its scheduler alone decides each
step, its block table is the group's, and it samples once from the all-gathered logits. Ranks
1..N-1 (followers) have no engine, scheduler or sampler: `follow()` receives each step's packed
inputs (the one int64 buffer `ModelRunner.pack` builds, placeholder ids already filled by rank
0) and runs the same forward pass, so every rank writes its own KV heads into the same slots.

The channel (`LockstepChannel`): while the leader is stepping, each step is two broadcasts from
rank 0 over the group (a fixed-size header: op, layout; then the buffer), three when the step
carries a message for the followers' `FollowerHook` (bytes: what a disaggregated prefill's ranks
must send in this step, `workers.tp_disagg`). Between bursts of work
the leader sends PAUSE and the followers wait on the group's TCPStore for a wake-up key instead
of in a collective, so an idle replica never runs into the collective timeout; a follower whose
leader died sees its store connection close (or the collective fail) and exits.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

import torch
from torch.distributed import DistStoreError

from tandem.engine.config import EngineConfig
from tandem.engine.model_runner import STEP_FIELDS, ModelRunner, StepLayout
from tandem.engine.models.llama import head_dim_of
from tandem.engine.scheduler import SchedulerOutput
from tandem.engine.tensor_parallel import TensorParallelGroup, check_tensor_parallel, head_shard


class StepOp(enum.IntEnum):
    STEP = 1  # a step's buffer follows
    PAUSE = 2  # the leader is idle: wait for the next wake-up key
    STOP = 3  # leave `follow()`


_HEADER_LEN = 5 + len(STEP_FIELDS)  # op, num_seqs, width, is_decode, message bytes, lengths


class FollowerHook(Protocol):
    """A follower's part in a step the leader sent a message with (the leader's KV connector
    wrote it): `on_step(message)` before the step's forward pass, which then runs eagerly with
    `layer_computed(i)` after each layer (as the leader's does), and `step_computed()` after it."""

    def on_step(self, message: bytes) -> None: ...

    def layer_computed(self, layer: int) -> None: ...

    def step_computed(self) -> None: ...


class LockstepChannel:
    """Rank 0's steps to ranks 1..N-1 (module docstring). The leader calls `send_step`,
    `pause` and `stop`; a follower calls `receive` until it returns STOP."""

    # A follower's wait for a wake-up is cut into waits this long (a timeout just waits again).
    WAKE_POLL = timedelta(hours=1)

    def __init__(self, tp: TensorParallelGroup) -> None:
        self.tp = tp
        self.awake = False  # followers are inside the collective loop
        self.epoch = 0  # wake-ups so far
        self.stopped = False

    def _wake_key(self) -> str:
        return f"{self.tp.prefix}.lockstep/wake/{self.epoch}"

    def _header(self, op: StepOp, layout: StepLayout | None, message_len: int = 0) -> torch.Tensor:
        values = [int(op), 0, 0, 0, 0, *([0] * len(STEP_FIELDS))]
        if layout is not None:
            values[1:] = [layout.num_seqs, layout.width, int(layout.is_decode), message_len, *layout.lengths]
        return torch.tensor(values, dtype=torch.int64).to(self.tp.device, non_blocking=True)

    # ------------------------------------------------------------------ leader
    def send_step(self, layout: StepLayout, buffer: torch.Tensor, message: bytes = b"") -> None:
        """`message`: for the followers' hook (non-empty: they run this step eagerly, with it)."""
        if self.stopped:
            raise RuntimeError("the tensor-parallel group was stopped")
        if not self.awake:
            self.tp.store.set(self._wake_key(), b"step")
            self.awake = True
        self.tp.broadcast(self._header(StepOp.STEP, layout, len(message)))
        self.tp.broadcast(buffer)
        if message:
            data = torch.frombuffer(bytearray(message), dtype=torch.uint8)
            self.tp.broadcast(data.to(self.tp.device))

    def pause(self) -> None:
        if self.awake and not self.stopped:
            self.tp.broadcast(self._header(StepOp.PAUSE, None))
            self.awake = False
            self.epoch += 1

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.awake:
            self.tp.broadcast(self._header(StepOp.STOP, None))
        else:
            self.tp.store.set(self._wake_key(), b"stop")

    # ---------------------------------------------------------------- follower
    def receive(self) -> tuple[StepOp, StepLayout | None, torch.Tensor | None, bytes]:
        if not self.awake:
            while True:
                try:
                    self.tp.store.wait([self._wake_key()], self.WAKE_POLL)
                    break
                except DistStoreError:  # a timeout: still idle (a dead leader raises DistNetworkError)
                    continue
            if self.tp.store.get(self._wake_key()) == b"stop":
                return StepOp.STOP, None, None, b""
            self.awake = True
        header = self.tp.broadcast(torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.tp.device)).tolist()
        op = StepOp(header[0])
        if op == StepOp.PAUSE:
            self.awake = False
            self.epoch += 1
        if op != StepOp.STEP:
            return op, None, None, b""
        layout = StepLayout(header[1], header[2], bool(header[3]), tuple(header[5:]))
        buffer = self.tp.broadcast(torch.empty(sum(layout.lengths), dtype=torch.int64, device=self.tp.device))
        message = b""
        if header[4]:
            data = self.tp.broadcast(torch.empty(header[4], dtype=torch.uint8, device=self.tp.device))
            message = data.cpu().numpy().tobytes()
        return op, layout, buffer, message


def check_engine_config(config: EngineConfig) -> None:
    """ValueError for the engine features that do not run under tensor parallelism yet."""
    if config.host_kv_cache_gb > 0:
        raise ValueError("the host KV tier is not supported with tensor parallelism yet "
                         "(its copies would reach rank 0's cache only); set host_kv_cache_gb=0")


class TensorParallelModelRunner(ModelRunner):
    """A `ModelRunner` whose model holds this rank's slice of every layer (`engine.tensor_parallel`)
    and whose KV cache holds only this rank's KV heads (same blocks, same block ids on every rank).
    Rank 0's `execute` sends each step to the followers; a follower runs `follow()`."""

    def __init__(self, config: EngineConfig, hf_config, weights=None, *, tp: TensorParallelGroup,
                 channel: LockstepChannel | None = None, loaded: Callable[[], None] | None = None) -> None:
        """`loaded()`: called once this rank's weights are loaded, before the first collective
        (a Serve group waits there for every rank: big checkpoints load slower than a timeout)."""
        check_tensor_parallel(hf_config, tp.world_size)
        check_engine_config(config)
        self.tp = tp
        self.channel = channel or LockstepChannel(tp)
        self._loaded = loaded
        # Leader: what the followers must do in a saving step (the KV connector's; see execute).
        self.step_message: Callable[[], bytes] | None = None
        # Follower: runs the steps that carry a message (`FollowerHook`).
        self.hook: FollowerHook | None = None
        super().__init__(config, hf_config, weights)

    def _load_model(self, weights=None) -> torch.nn.Module:
        model = super()._load_model(weights)
        if self._loaded is not None:
            self._loaded()
        return model

    @property
    def tensor_parallel_size(self) -> int:
        return self.tp.world_size

    def _build_model(self, cls) -> torch.nn.Module:
        return cls(self.hf_config, tp=self.tp)

    def _read_weight(self, f, name: str):
        return f.get_slice(name)  # the model reads only its rank's part

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        c = self.hf_config
        heads = head_shard(c.num_attention_heads, c.num_key_value_heads, self.tp.rank, self.tp.world_size)
        return (c.num_hidden_layers, 2, num_blocks, self.block_size, len(heads.kv_heads), head_dim_of(c))

    def _num_blocks_from_memory(self) -> int:
        # Every rank must hold every block id the leader's block manager hands out.
        return self.tp.all_reduce_min(super()._num_blocks_from_memory())

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, prev_tokens: torch.Tensor | None = None,
                layer_done=None) -> torch.Tensor:
        if self.tp.rank != 0:
            raise RuntimeError(f"tensor-parallel rank {self.tp.rank} follows rank 0's steps (follow()); "
                               "only rank 0 executes scheduled steps")
        layout, packed = self.pack(sched, prev_tokens)
        buffer = self._to_device(packed)
        inputs = self.unpack(layout, buffer, prev_tokens)  # fills placeholder ids in `buffer`
        message = b""
        if layer_done is not None:
            # A saving step (the connector streams layers): the followers stream their heads of
            # the same layers, told what to send by the connector's message; they and this rank
            # both run it eagerly, so every rank issues the same collectives in the same way.
            if self.step_message is None:
                raise RuntimeError("a per-layer KV save with tensor parallelism needs the connector's "
                                   "step messages (runner.step_message)")
            message = self.step_message()
        self.channel.send_step(layout, buffer, message)
        return self.forward(inputs, layout.num_seqs, layer_done)

    def idle(self) -> None:
        """Rank 0, going idle: the followers wait outside the collectives until the next step."""
        self.channel.pause()

    @torch.inference_mode()
    def follow(self) -> None:
        """Ranks 1..N-1: run rank 0's steps until it stops the group."""
        while True:
            op, layout, buffer, message = self.channel.receive()
            if op == StepOp.STOP:
                return
            if op != StepOp.STEP:
                continue
            inputs = self.unpack(layout, buffer, None, fill_placeholders=False)
            if not message:
                self.forward(inputs, layout.num_seqs)
                continue
            if self.hook is None:
                raise RuntimeError(f"tensor-parallel rank {self.tp.rank} got a step message but has no hook "
                                   "(a disaggregated group's ranks must all be started with their role)")
            self.hook.on_step(message)
            self.forward(inputs, layout.num_seqs, self.hook.layer_computed)
            self.hook.step_computed()
