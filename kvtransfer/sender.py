"""The prefill side: streams KV blocks of a request, layer range by layer range, to a receiver.

`KVSender.begin` opens a `SendSession`; the caller hands it layers as the prefill computes them
(`send_layers`), which returns at once: one I/O thread per receiver ("link") gathers the layers
into a staging buffer, announces it on the control channel and posts the send on the pair's
process group, keeping a few messages in flight. `finish` waits for the receiver's
acknowledgement. Layers are coalesced up to `min_message_bytes` so messages stay large.

With tensor parallelism a session may carry a head slice `src_heads` of this cache into the
receiver's heads from `dst_head_start` on: one part of a request that several senders fill
(see `tp_plan.plan_head_parts`). Only the slice's bytes are staged and sent.
"""
from __future__ import annotations

import collections
import contextlib
import math
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import zmq
from torch.distributed import TCPStore

from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.errors import TransferError
from tandem.kvtransfer.messages import (
    Begin, Cancel, Chunk, Done, Error, Hello, Message, MessageError, Ping, Welcome, decode,
    dtype_name, encode,
)
from tandem.kvtransfer.metrics import MetricsCounter, TransferMetrics
from tandem.kvtransfer.pair import (
    SENDER_RANK, Mailbox, abort_group, make_pair_group, pair_prefix, wait_work,
)
from tandem.kvtransfer.staging import block_id_tensor, check_kv_cache, check_kv_scales, gather_layers, staging_shape


class SendSession:
    """One request's transfer (all heads, or one head slice) to one receiver. Not thread-safe:
    call from one thread."""

    def __init__(self, sender: "KVSender", link: "_ReceiverLink", request_id: str,
                 src_ids: torch.Tensor, dst_list: list[int], num_layers: int,
                 src_heads: tuple[int, int], dst_head_start: int) -> None:
        self.request_id = request_id
        self.peer = link.peer
        self.num_layers = num_layers
        self._sender = sender
        self._link = link
        self.src_ids = src_ids
        self.dst_list = dst_list
        self.src_heads = src_heads            # [start, end) of this cache's heads that are sent
        self.dst_head_start = dst_head_start  # where they land in the receiver's cache
        self._next_layer = 0          # caller side: next layer send_layers accepts
        self._pending_start = 0       # caller side: first layer not yet handed to the link
        self._layer_bytes = _layer_bytes(sender.kv_cache, len(dst_list), src_heads)
        self._max_layers_per_message = max(1, sender.config.max_message_bytes // self._layer_bytes)
        # link side
        self.epoch = -1
        self.t_begin = 0.0
        self.error: TransferError | None = None
        self.acknowledged = False
        self.layers_sent = 0          # link side: layers whose send completed
        self._lock = threading.Lock()
        self._finished = threading.Event()

    def send_layers(self, layer_start: int, layer_end: int) -> None:
        """Queues layers [layer_start, layer_end) (computed; in order) for sending; never blocks."""
        if self.error is not None:
            raise self.error
        if type(layer_start) is not int or type(layer_end) is not int:
            raise TypeError("layer_start and layer_end must be ints")
        if layer_start != self._next_layer or not layer_start < layer_end <= self.num_layers:
            raise ValueError(f"send_layers({layer_start}, {layer_end}): layers must be sent in order; "
                             f"next is {self._next_layer}, total {self.num_layers}")
        self._next_layer = layer_end
        pending = (self._next_layer - self._pending_start) * self._layer_bytes
        if pending >= self._sender.config.min_message_bytes or self._next_layer == self.num_layers:
            self._flush()

    @property
    def layers_queued(self) -> int:
        """Layers passed to `send_layers` so far (the next call starts there)."""
        return self._next_layer

    def finish(self, timeout: float | None = None) -> None:
        """Waits until the receiver acknowledged every layer; raises TransferError otherwise."""
        if self._next_layer != self.num_layers and self.error is None:
            raise ValueError(f"finish() before all layers were passed to send_layers "
                             f"({self._next_layer}/{self.num_layers})")
        timeout = self._sender.config.timeout_s if timeout is None else timeout
        if not self._finished.wait(timeout):
            self.abort(f"no acknowledgement from receiver within {timeout:g}s")
        if self.error is not None:
            raise self.error

    def abort(self, reason: str = "aborted by sender") -> None:
        """Fails the session and tells the receiver (best effort)."""
        if self._fail(reason):
            self._link.post(("cancel", self, reason))

    def done(self) -> bool:
        return self._finished.is_set()

    def _flush(self) -> None:
        event = None
        if self._sender.kv_cache.is_cuda:
            # marks "layers computed so far" on the caller's stream; the link's stream waits on it
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._sender.kv_cache.device))
        start = self._pending_start
        while start < self._next_layer:
            end = min(self._next_layer, start + self._max_layers_per_message)
            self._link.post(("chunk", self, start, end, event))
            start = end
        self._pending_start = self._next_layer

    def _fail(self, reason: str, from_receiver: bool = False) -> bool:
        with self._lock:
            if self._finished.is_set():
                return False
            prefix = "receiver: " if from_receiver else ""
            self.error = TransferError(self.request_id, prefix + reason)
            self._finished.set()
        self._sender._metrics.add(transfers_failed=1)
        return True

    def _succeed(self) -> None:
        with self._lock:
            if self._finished.is_set():
                return
            self.acknowledged = True
            self._finished.set()
        self._sender._metrics.add(transfers_ok=1, transfer_seconds=time.monotonic() - self.t_begin)


class KVSender:
    """Sends blocks of `kv_cache` [L, 2, num_blocks, bs, H, D] (CPU or CUDA, any dtype)."""

    def __init__(self, kv_cache: torch.Tensor, config: KVTransferConfig = KVTransferConfig(),
                 kv_scales: Sequence[float] = ()) -> None:
        """`kv_scales`: an FP8 cache's per-layer (k, v) scales, k0, v0, k1, ... (default all 1.0),
        announced with each transfer so the receiver can refuse blocks it would misread."""
        check_kv_cache(kv_cache)
        dtype_name(kv_cache.dtype)
        self.kv_scales = check_kv_scales(kv_cache, kv_scales)
        self.kv_cache = kv_cache
        self.config = config
        self.worker_id = config.worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:10]}"
        self._metrics = MetricsCounter()
        self._zmq = zmq.Context()
        self._links: dict[str, _ReceiverLink] = {}
        self._lock = threading.Lock()
        self._closed = False

    def begin(self, request_id: str, peer: str, src_block_ids, dst_block_ids,
              num_layers: int | None = None, src_heads: tuple[int, int] | None = None,
              dst_head_start: int = 0) -> SendSession:
        """Opens a transfer of layers [0, num_layers) of `src_block_ids` here into the receiver's
        `dst_block_ids`; `peer` is the receiver's `KVReceiver.address` ("tcp://host:port").

        `src_heads=(a, b)` sends only heads [a, b) of this cache (None: all of them), into the
        receiver's heads [dst_head_start, dst_head_start + b - a): one part of the request, which
        the receiver must have registered (`KVReceiver.expect(..., head_ranges)`)."""
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 256:
            raise ValueError(f"request_id must be a str of 1-256 chars, got {request_id!r}")
        _parse_peer(peer)
        total = self.kv_cache.shape[0]
        num_layers = total if num_layers is None else num_layers
        if type(num_layers) is not int or not 1 <= num_layers <= total:
            raise ValueError(f"num_layers must be an int in [1, {total}], got {num_layers!r}")
        src = block_id_tensor(src_block_ids, self.kv_cache.shape[2], self.kv_cache.device,
                              "src_block_ids", unique=False)
        dst = [int(b) for b in dst_block_ids]
        if len(dst) != src.numel():
            raise ValueError(f"{src.numel()} src blocks but {len(dst)} dst blocks")
        if any(b < 0 for b in dst) or len(set(dst)) != len(dst):
            raise ValueError("dst_block_ids must be distinct non-negative ints")
        if len(dst) > self.config.max_blocks_per_request:
            raise ValueError(f"{len(dst)} blocks exceed max_blocks_per_request")
        heads = self._check_heads(src_heads, dst_head_start)
        layer_bytes = _layer_bytes(self.kv_cache, len(dst), heads)
        if layer_bytes > self.config.max_message_bytes:
            raise ValueError(f"one layer of this request is {layer_bytes} bytes, above "
                             f"max_message_bytes={self.config.max_message_bytes}")
        link = self._link(peer)
        session = SendSession(self, link, request_id, src, dst, num_layers, heads, dst_head_start)
        link.post(("begin", session))
        return session

    def _check_heads(self, src_heads, dst_head_start) -> tuple[int, int]:
        num_heads = self.kv_cache.shape[4]
        if src_heads is None:
            heads = (0, num_heads)
        else:
            heads = tuple(src_heads) if isinstance(src_heads, (tuple, list)) else ()
            if len(heads) != 2 or any(type(h) is not int for h in heads) \
                    or not 0 <= heads[0] < heads[1] <= num_heads:
                raise ValueError(f"src_heads must be (start, end) ints with 0 <= start < end <= "
                                 f"{num_heads} (this cache's heads), got {src_heads!r}")
        # The wire format bounds head indices (messages: head_start <= 2**20).
        if type(dst_head_start) is not int or not 0 <= dst_head_start <= 1 << 20:
            raise ValueError(f"dst_head_start must be an int in [0, 2**20], got {dst_head_start!r}")
        return heads

    def send(self, request_id: str, peer: str, src_block_ids, dst_block_ids,
             num_layers: int | None = None, timeout: float | None = None,
             src_heads: tuple[int, int] | None = None, dst_head_start: int = 0) -> None:
        """One-shot: all layers at once, then wait for the acknowledgement."""
        session = self.begin(request_id, peer, src_block_ids, dst_block_ids, num_layers,
                             src_heads=src_heads, dst_head_start=dst_head_start)
        session.send_layers(0, session.num_layers)
        session.finish(timeout)

    def metrics(self) -> TransferMetrics:
        return self._metrics.snapshot()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            links = list(self._links.values())
        for link in links:
            link.post(("stop",))
        for link in links:
            link.thread.join(timeout=5)
        if not any(link.thread.is_alive() for link in links):
            self._zmq.term()  # a link stuck in a wait keeps its socket; never block close() on it

    def __enter__(self) -> "KVSender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _link(self, peer: str) -> "_ReceiverLink":
        with self._lock:
            if self._closed:
                raise RuntimeError("KVSender is closed")
            link = self._links.get(peer)
            if link is None:
                link = self._links[peer] = _ReceiverLink(self, peer)
            return link


@dataclass(eq=False)
class _InFlight:
    session: SendSession
    layer_end: int
    nbytes: int
    staging: torch.Tensor
    work: object
    deadline: float


class _ReceiverLink:
    """Everything about one receiver, owned by one thread: socket, pair group, epoch, sequence."""

    def __init__(self, sender: KVSender, peer: str) -> None:
        self.sender = sender
        self.peer = peer
        self.host, _ = _parse_peer(peer)
        self.config = sender.config
        self.mailbox = Mailbox()
        self.group = None
        self.epoch = -1
        self.next_seq = 0
        self.sessions: dict[str, SendSession] = {}
        self.inflight: collections.deque[_InFlight] = collections.deque()
        self._store: TCPStore | None = None
        self._welcome: Welcome | None = None
        self._last_ping = 0.0
        self._stream = None
        self.thread = threading.Thread(target=self._run, name=f"kv-send-{peer}", daemon=True)
        self.thread.start()

    def post(self, job: tuple) -> None:
        self.mailbox.put(job)

    # ---- thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        device = self.sender.kv_cache.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
            self._stream = torch.cuda.Stream(device)
        self.sock = self.sender._zmq.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.sender.worker_id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.peer)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.mailbox.fd, zmq.POLLIN)
        try:
            ctx = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
            with ctx:
                while True:
                    poller.poll(timeout=int(self.config.heartbeat_s * 1000))
                    self._read_replies()
                    for job in self.mailbox.drain():
                        if job[0] == "stop":
                            return
                        self._do(job)
                    while self.inflight:
                        self._complete_oldest()
                    self._maybe_ping()
        finally:
            self._break_pair("sender closed")
            for session in list(self.sessions.values()):
                session._fail("sender closed")
            self.sock.close(0)
            self.mailbox.close()

    def _do(self, job: tuple) -> None:
        kind, session = job[0], job[1]
        if kind == "begin":
            self._begin(session)
        elif kind == "chunk":
            self._chunk(session, *job[2:])
        elif kind == "cancel":
            self.sessions.pop(session.request_id, None)
            if session.epoch == self.epoch and self.group is not None:
                self._send(Cancel(session.request_id, job[2][:2048]))

    def _begin(self, session: SendSession) -> None:
        if session.done():
            return
        if session.request_id in self.sessions:
            session._fail(f"a transfer of this request to {self.peer} is already open")
            return
        try:
            self._ensure_pair()
        except Exception as exc:
            session._fail(f"cannot pair with {self.peer}: {exc}")
            return
        session.epoch = self.epoch
        session.t_begin = time.monotonic()
        self.sessions[session.request_id] = session
        _, _, _, bs, _, dim = self.sender.kv_cache.shape
        start, end = session.src_heads
        self._send(Begin(session.request_id, self.epoch, session.dst_list, session.num_layers,
                         dtype_name(self.sender.kv_cache.dtype), [bs, end - start, dim],
                         self.sender.kv_scales, session.dst_head_start))

    def _chunk(self, session: SendSession, layer_start: int, layer_end: int, event) -> None:
        if session.done():
            return
        if self.group is None or session.epoch != self.epoch:
            session._fail(f"pair with {self.peer} broke before layer {layer_start}")
            return
        if event is not None:
            self._stream.wait_event(event)
        staging = gather_layers(self.sender.kv_cache, layer_start, layer_end, session.src_ids,
                                session.src_heads)
        nbytes = staging.numel() * staging.element_size()
        seq = self.next_seq
        self.next_seq += 1
        self._send(Chunk(session.request_id, self.epoch, seq, layer_start, layer_end, nbytes,
                         dtype_name(staging.dtype), list(staging.shape)))
        try:
            work = self.group.send([staging], 1 - SENDER_RANK, seq & 0x7FFFFFFF)
        except Exception as exc:
            self._break_pair(f"send to {self.peer} failed: {exc}")
            return
        self.inflight.append(_InFlight(session, layer_end, nbytes, staging, work,
                                       time.monotonic() + self.config.timeout_s))
        if len(self.inflight) > self.config.max_inflight_messages:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        item = self.inflight.popleft()
        try:
            wait_work(item.work, item.deadline, self._stream is not None, on_idle=self._idle)
        except Exception as exc:
            self.inflight.appendleft(item)
            self._break_pair(f"send to {self.peer} failed: {exc}")
            return
        item.session.layers_sent = item.layer_end
        self.sender._metrics.add(bytes_sent=item.nbytes, messages_sent=1)

    def _idle(self) -> None:
        self._read_replies()
        self._maybe_ping()

    # ---- pairing ------------------------------------------------------------------------------

    def _ensure_pair(self) -> None:
        if self.group is not None:
            return
        self._welcome = None
        self._send(Hello(self.sender.worker_id))
        deadline = time.monotonic() + self.config.connect_timeout_s
        while self._welcome is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferError(None, f"no answer to hello from {self.peer} "
                                          f"within {self.config.connect_timeout_s:g}s")
            if self.sock.poll(timeout=int(min(left, 0.1) * 1000) + 1):
                self._read_replies()
        welcome = self._welcome
        timeout = max(self.config.timeout_s, self.config.connect_timeout_s)
        if self._store is None or self._store.port != welcome.store_port:
            self._store = TCPStore(self.host, welcome.store_port, is_master=False,
                                   timeout=timedelta(seconds=timeout))
        prefix = pair_prefix(self.sender.worker_id, welcome.receiver_id, welcome.epoch)
        self.group = make_pair_group(self._store, prefix, SENDER_RANK,
                                     self.sender.kv_cache.device, timeout)
        self.epoch = welcome.epoch
        self.next_seq = 0
        self._last_ping = time.monotonic()
        self.sender._metrics.add(pairs_created=1)

    def _break_pair(self, reason: str) -> None:
        """Aborts the group; sessions with data not yet delivered fail. The next begin re-pairs."""
        if self.group is None:
            return
        abort_group(self.group)
        self.group = None
        self.sender._metrics.add(pairs_broken=1)
        self.inflight.clear()
        for session in list(self.sessions.values()):
            if session.layers_sent == session.num_layers:
                continue  # all data delivered; the receiver's Done/Error still decides
            if session._fail(reason):
                self.sessions.pop(session.request_id, None)
                self._send(Cancel(session.request_id, reason[:2048]))

    # ---- control channel ----------------------------------------------------------------------

    def _send(self, msg: Message) -> None:
        try:
            self.sock.send(encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # peer unreachable: its timeouts and our deadlines turn this into errors

    def _maybe_ping(self) -> None:
        now = time.monotonic()
        if self.group is not None and now - self._last_ping >= self.config.heartbeat_s:
            self._last_ping = now
            self._send(Ping())

    def _read_replies(self) -> None:
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(frame)
            except MessageError:
                continue  # a broken receiver: our deadlines turn silence into errors
            if isinstance(msg, Welcome):
                self._welcome = msg
            elif isinstance(msg, Done):
                session = self.sessions.pop(msg.request_id, None)
                if session is not None:
                    session._succeed()
            elif isinstance(msg, Error):
                if msg.request_id is None:
                    self._break_pair(f"receiver {self.peer} dropped the pair: {msg.reason}")
                else:
                    session = self.sessions.pop(msg.request_id, None)
                    if session is not None:
                        session._fail(msg.reason, from_receiver=True)


def _parse_peer(peer: str) -> tuple[str, int]:
    if not isinstance(peer, str) or not peer.startswith("tcp://"):
        raise ValueError(f"peer must be a receiver address 'tcp://host:port', got {peer!r}")
    host, sep, port = peer[len("tcp://"):].rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"peer must be 'tcp://host:port', got {peer!r}")
    return host.strip("[]"), int(port)


def _layer_bytes(kv_cache: torch.Tensor, num_blocks: int, heads: tuple[int, int]) -> int:
    """Bytes one layer of a request adds to a message: only the heads that are sent."""
    return math.prod(staging_shape(kv_cache, 1, num_blocks, heads)) * kv_cache.element_size()

