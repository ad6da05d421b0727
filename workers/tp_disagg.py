"""KV transfer between tensor-parallel groups: every prefill rank sends the KV heads it holds
to the decode ranks holding them.

A prefill replica of degree p saving to a decode replica of degree d: KV head h lives on the
prefill ranks whose slice holds it and on the decode ranks whose slice holds it
(`engine.tensor_parallel.head_shard`). `kvtransfer.plan_head_parts` picks, for each decode rank,
one prefill rank per head, and merges a pair's heads into one part: each prefill rank sends its
part straight to each decode rank it feeds, one session per (rank pair), its layers coalesced
into messages as for any transfer, so a request costs at most (rank pairs x layer groups)
messages, never one per head or per block.

Rank 0 (the engine's `PrefillConnector`, `workers.disagg`) plans each save; it sends its own
parts and tells the other ranks theirs in the step's lockstep message (`engine.tp_runner`), so
every rank begins its sessions before the forward pass that computes the KV, and streams each
layer as its own forward computes it. A follower reports each session's end under a key of the
group's TCPStore; rank 0's `save_done` reads the keys, so a request's blocks are freed only once
every rank's copy left them.

On the decode side every follower rank has a `KVReceiver` (`DecodeFollower`), whose
expectations rank 0's `DecodeConnector` registers, waits for and aborts through the rank actor.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from datetime import timedelta

import msgpack
import torch

from tandem.kvtransfer import KVReceiver, KVSender, KVTransferConfig, ReceiveHandle, SendSession, TransferError


def rank_kv_heads(num_kv_heads: int, world_size: int) -> list[tuple[int, int]]:
    """The global KV-head range [lo, hi) each rank's cache holds, by rank."""
    from tandem.engine.tensor_parallel import kv_head_shard

    return [(r.start, r.stop) for r in (kv_head_shard(num_kv_heads, rank, world_size) for rank in range(world_size))]


def save_key(prefix: str, request_id: str, rank: int) -> str:
    """Where follower `rank` reports how its sessions of `request_id` ended (b"" when acknowledged)."""
    return f"{prefix}/kvsave/{request_id}/{rank}"


@dataclass(frozen=True)
class RankSend:
    """One session a rank opens for a save: its heads [src_heads) to a decode rank's receiver."""

    peer: str
    src_heads: tuple[int, int]
    dst_head_start: int


def encode_ops(ops: list[dict]) -> bytes:
    return msgpack.packb(ops, use_bin_type=True)


def save_op(rank: int, request_id: str, src_block_ids: list[int], dst_block_ids: list[int],
            sends: list[RankSend]) -> dict:
    return {"op": "save", "rank": rank, "rid": request_id, "src": list(src_block_ids), "dst": list(dst_block_ids),
            "sends": [[s.peer, s.src_heads[0], s.src_heads[1], s.dst_head_start] for s in sends]}


def abort_op(request_id: str) -> dict:
    return {"op": "abort", "rid": request_id}


class PrefillFollower:
    """A follower rank's `FollowerHook` in a prefill group: opens the sessions rank 0 named for
    it, streams its heads layer by layer, reports each save's end to the group's store."""

    def __init__(self, kv_cache: torch.Tensor, transfer: KVTransferConfig, rank: int, store_host: str,
                 store_port: int, prefix: str, kv_scales=()) -> None:
        from torch.distributed import TCPStore

        self.rank = rank
        self.prefix = prefix
        self.sender = KVSender(kv_cache, transfer, kv_scales)
        self._timeout_s = 2 * transfer.timeout_s + transfer.connect_timeout_s
        # Its own store client: the rank's main thread blocks in the group client's waits.
        self._store = TCPStore(store_host, store_port, is_master=False,
                               timeout=timedelta(seconds=max(30.0, self._timeout_s)))
        self._in_step: list[SendSession] = []
        self._step_saves: list[tuple[str, list[SendSession]]] = []  # begun in the step being run
        self._open: dict[str, list[SendSession]] = {}
        self._ended: queue.SimpleQueue = queue.SimpleQueue()
        self._reporter = threading.Thread(target=self._report, name=f"kv-save-report-{rank}", daemon=True)
        self._reporter.start()

    # FollowerHook -------------------------------------------------------------------------
    def on_step(self, message: bytes) -> None:
        for op in msgpack.unpackb(message, raw=False):
            if op["op"] == "abort":
                for session in self._open.pop(op["rid"], []):
                    session.abort("request aborted on the prefill worker")
            elif op["op"] == "save" and op["rank"] == self.rank:
                self._begin(op)

    def layer_computed(self, layer: int) -> None:
        for session in self._in_step:
            if not session.done() and session.layers_queued <= layer:
                try:
                    session.send_layers(session.layers_queued, layer + 1)
                except TransferError:
                    pass  # the session failed; its end is reported with its error

    def step_computed(self) -> None:
        for session in self._in_step:
            if not session.done() and session.layers_queued < session.num_layers:
                try:
                    session.send_layers(session.layers_queued, session.num_layers)
                except TransferError:
                    pass
        self._in_step.clear()
        # Every layer is handed over: from here the acknowledgements are waited for.
        for rid, sessions in self._step_saves:
            self._ended.put((rid, sessions, None))
        self._step_saves.clear()

    # ---------------------------------------------------------------------------------------
    def _begin(self, op: dict) -> None:
        rid = op["rid"]
        sessions, error = [], None
        for peer, h0, h1, dst_h0 in op["sends"]:
            try:
                sessions.append(self.sender.begin(rid, peer, op["src"], op["dst"], src_heads=(h0, h1),
                                                  dst_head_start=dst_h0))
            except (TransferError, ValueError, RuntimeError) as exc:
                error = f"rank {self.rank}: send failed: {exc}"
                break
        if error is not None:
            for session in sessions:
                session.abort(error)
            self._ended.put((rid, [], error))
            return
        self._open[rid] = sessions
        self._in_step.extend(sessions)
        self._step_saves.append((rid, sessions))

    def _report(self) -> None:
        while True:
            item = self._ended.get()
            if item is None:
                return
            rid, sessions, error = item
            for session in sessions:
                try:
                    session.finish(self._timeout_s)
                except Exception as exc:  # TransferError; a bug must not end the reports either
                    error = error or f"rank {self.rank}: {exc}"
            self._open.pop(rid, None)
            try:
                self._store.set(save_key(self.prefix, rid, self.rank), (error or "").encode())
            except Exception:  # the group is gone (rank 0 died): nobody waits for the report
                return

    def close(self) -> None:
        self._ended.put(None)
        self.sender.close()


def prefill_follower(transfer: KVTransferConfig, runner) -> PrefillFollower:
    """The hook of a prefill group's follower `runner` (a `TensorParallelModelRunner`)."""
    store = runner.tp.store
    return PrefillFollower(runner.kv_cache, transfer, runner.tp.rank, store.host, store.port, runner.tp.prefix,
                           runner.kv_scales.flat() if runner.kv_scales else [])


class DecodeFollower:
    """A follower rank's part in a tensor-parallel decode group: a `KVReceiver` over its cache,
    whose expectations rank 0's `DecodeConnector` registers (and aborts) through the rank's actor
    before it asks for the prefill; the steps themselves carry nothing for it."""

    def __init__(self, kv_cache: torch.Tensor, transfer: KVTransferConfig, kv_scales=()) -> None:
        self.receiver = KVReceiver(kv_cache, transfer, kv_scales)
        self._handles: dict[str, ReceiveHandle] = {}

    def on_step(self, message: bytes) -> None:
        pass

    def layer_computed(self, layer: int) -> None:
        pass

    def step_computed(self) -> None:
        pass

    def expect(self, transfer_id: str, dst_block_ids: list[int], num_layers: int,
               head_ranges: list[tuple[int, int]]) -> None:
        self._handles[transfer_id] = self.receiver.expect(transfer_id, dst_block_ids, num_layers, head_ranges)

    def wait(self, transfer_id: str, timeout_s: float) -> str | None:
        """Blocks until this rank's heads landed (None) or the transfer failed (why)."""
        handle = self._handles.get(transfer_id)
        if handle is None:
            return "not expected on this rank"
        try:
            handle.wait(timeout_s)
            return None
        except TransferError as error:
            return f"{error}"
        finally:
            self._handles.pop(transfer_id, None)

    def abort(self, transfer_id: str, reason: str) -> None:
        """Nothing lands in the transfer's blocks on this rank after this returns."""
        self.receiver.abort(transfer_id, reason)
        self._handles.pop(transfer_id, None)

    def close(self) -> None:
        self.receiver.close()


def decode_follower(transfer: KVTransferConfig, runner) -> DecodeFollower:
    """The hook of a decode group's follower `runner` (a `TensorParallelModelRunner`)."""
    return DecodeFollower(runner.kv_cache, transfer, runner.kv_scales.flat() if runner.kv_scales else [])
