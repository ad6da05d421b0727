"""The decode side: registers expected transfers and lands incoming KV blocks into them.

A request's KV heads are split into parts (contiguous head ranges, `expect(..., head_ranges)`;
by default one part of all heads); each part is filled by one sender's session, so with tensor
parallelism several prefill ranks fill one decode rank's blocks. The request succeeds when every
part landed every layer and fails as a whole if any part does.

Threads: one control thread owns the zmq ROUTER socket (parses and validates every message,
answers errors, watches sender heartbeats); one thread per paired sender owns that pair's
process group and posts its recvs in announcement order, then scatters into the registered
blocks. Only blocks registered by `expect` for the announced request, and within them only the
heads of the part the sender announced, are ever written.
"""
from __future__ import annotations

import collections
import contextlib
import math
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import zmq
from torch.distributed import TCPStore

from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.errors import TransferError
from tandem.kvtransfer.messages import (
    WIRE_DTYPES, Begin, Cancel, Chunk, Done, Error, Hello, Message, MessageError, Ping, Welcome,
    decode, dtype_name, encode,
)
from tandem.kvtransfer.metrics import MetricsCounter, TransferMetrics
from tandem.kvtransfer.pair import (
    RECEIVER_RANK, Mailbox, abort_group, make_pair_group, pair_prefix, wait_work,
)
from tandem.kvtransfer.staging import block_id_tensor, check_kv_cache, check_kv_scales, scatter_layers

_MAX_FRAME_BYTES = 64 << 20
_MAX_TOLD = 1024  # request ids per pair whose failure its sender was told of (see `_SenderLink.told`)


class ReceiveHandle:
    """What `KVReceiver.expect` returns; `wait` until every layer landed."""

    def __init__(self, receiver: "KVReceiver", request: "_Request") -> None:
        self._receiver = receiver
        self._request = request

    @property
    def request_id(self) -> str:
        return self._request.request_id

    @property
    def layers_received(self) -> int:
        """Layers landed in every part (all heads) so far."""
        return self._request.layers_landed

    @property
    def head_ranges(self) -> list[tuple[int, int]]:
        return [(part.start, part.end) for part in self._request.parts]

    def done(self) -> bool:
        """True once the transfer succeeded or failed (never blocks)."""
        return self._request.finished.is_set()

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        """Calls `fn()` once the transfer succeeded or failed: at once (here) if it already has,
        else on the receiver's thread that ends it, so `fn` must be quick and must not block
        (hand the news to your own thread or event loop). Exceptions it raises are dropped."""
        request = self._request
        with request.lock:
            if not request.finished.is_set():
                request.callbacks.append(fn)
                return
        _call(fn)

    def wait(self, timeout: float | None = None) -> None:
        """Returns when all layers landed; raises TransferError on failure, abort or timeout.

        On timeout the request is aborted, so no late data is written into its blocks."""
        timeout = self._receiver.config.timeout_s if timeout is None else timeout
        if not self._request.finished.wait(timeout):
            self._receiver.abort(self.request_id, f"timed out after {timeout:g}s waiting for KV")
        if self._request.error is not None:
            raise self._request.error


@dataclass(eq=False)
class _Part:
    """Heads [start, end) of a request, filled by exactly one sender's session."""
    start: int
    end: int
    sender: bytes | None = None  # bound by the first acceptable Begin naming `start`
    epoch: int = -1
    next_announced_layer: int = 0
    layers_landed: int = 0

    @property
    def width(self) -> int:
        return self.end - self.start


@dataclass(eq=False)
class _Request:
    request_id: str
    dst_ids: torch.Tensor
    dst_list: list[int]
    num_layers: int
    parts: list[_Part]
    state: str = "expecting"  # expecting → active (a part is bound) → ok | failed
    bytes_landed: int = 0
    t_begin: float = 0.0
    error: TransferError | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    finished: threading.Event = field(default_factory=threading.Event)
    callbacks: list = field(default_factory=list)  # ReceiveHandle.add_done_callback's, run once at the end

    @property
    def layers_landed(self) -> int:
        return min(part.layers_landed for part in self.parts)

    def senders(self) -> list[bytes]:
        return [part.sender for part in self.parts if part.sender is not None]

    def set_finished(self) -> None:
        """The transfer ended (state ok or failed): wake `wait`, run the callbacks."""
        self.finished.set()
        with self.lock:
            callbacks, self.callbacks = self.callbacks, []
        for fn in callbacks:
            _call(fn)


@dataclass(eq=False)
class _RecvJob:
    chunk: Chunk
    target: _Request | None  # None: drain into scratch (rejected), keeping the pair in step
    part: _Part | None = None


@dataclass(eq=False)
class _SenderLink:
    identity: bytes
    sender_id: str
    epoch: int
    last_seen: float
    jobs: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    next_seq: int = 0
    group: object = None
    broken: bool = False
    thread: threading.Thread | None = None
    # Requests this sender was sent an Error for. Its chunks of them still in flight are drained
    # without another reply: replies name only the request, so a late one could reach (and fail)
    # a later session of the same request on this pair. A Begin for the request reopens it.
    told: collections.OrderedDict = field(default_factory=collections.OrderedDict)


class KVReceiver:
    """Receives KV blocks into `kv_cache` [L, 2, num_blocks, bs, H, D] (CPU or CUDA, any dtype)."""

    def __init__(self, kv_cache: torch.Tensor, config: KVTransferConfig = KVTransferConfig(),
                 kv_scales: Sequence[float] = ()) -> None:
        """`kv_scales`: an FP8 cache's per-layer (k, v) scales, k0, v0, k1, ... (default all 1.0);
        a sender announcing others is refused (its blocks would decode to other values here)."""
        check_kv_cache(kv_cache)
        dtype_name(kv_cache.dtype)  # fails early on an untransferable dtype
        self._kv_scales = check_kv_scales(kv_cache, kv_scales)
        self.config = config
        self.kv_cache = kv_cache
        self.worker_id = config.worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:10]}"
        self._dtype = dtype_name(kv_cache.dtype)
        self._block_shape = list(kv_cache.shape[3:])
        self._lock = threading.Lock()
        self._requests: dict[str, _Request] = {}
        self._claimed: set[int] = set()
        self._links: dict[bytes, _SenderLink] = {}
        self._epochs: dict[bytes, int] = {}
        self._metrics = MetricsCounter()
        self._outbox = Mailbox()
        self._stop = threading.Event()

        store_fd, store_port = _listen(config.bind_host, config.store_port)
        try:
            # Given no socket, a TCPStore master listens on every interface whatever its host;
            # handed one bound to `bind_host`, it takes that socket over (and closes it).
            self._store = TCPStore(config.bind_host, store_port, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=max(config.timeout_s, config.connect_timeout_s)),
                                   master_listen_fd=store_fd)
        except BaseException:
            os.close(store_fd)
            raise
        self._zmq = zmq.Context()
        self._router = self._zmq.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, _MAX_FRAME_BYTES)
        port = config.control_port
        endpoint = f"tcp://{config.bind_host}:{port}" if port else f"tcp://{config.bind_host}"
        if port:
            self._router.bind(endpoint)
        else:
            port = self._router.bind_to_random_port(endpoint)
        host = config.advertise_host or config.bind_host
        self.address = f"tcp://{host}:{port}"
        self._control = threading.Thread(target=self._control_loop, name="kv-recv-control", daemon=True)
        self._control.start()

    # ---- public API -------------------------------------------------------------------------

    def expect(self, request_id: str, dst_block_ids, num_layers: int,
               head_ranges: Sequence[tuple[int, int]] | None = None) -> ReceiveHandle:
        """Registers a transfer into `dst_block_ids` (allocated by the caller) before it is sent.

        `head_ranges`: the parts the request's heads come in, [start, end) ranges of this cache's
        heads, sorted, disjoint and covering all of them; each is filled by one sender (a `Begin`
        with that `head_start` and width). None: one part, all heads, one sender."""
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 256:
            raise ValueError(f"request_id must be a str of 1-256 chars, got {request_id!r}")
        total_layers = self.kv_cache.shape[0]
        if type(num_layers) is not int or not 1 <= num_layers <= total_layers:
            raise ValueError(f"num_layers must be an int in [1, {total_layers}], got {num_layers!r}")
        parts = _parts(head_ranges, self.kv_cache.shape[4])
        ids = block_id_tensor(dst_block_ids, self.kv_cache.shape[2], self.kv_cache.device,
                              "dst_block_ids", unique=True)
        if ids.numel() > self.config.max_blocks_per_request:
            raise ValueError(f"{ids.numel()} blocks exceed max_blocks_per_request")
        dst_list = ids.tolist()
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("KVReceiver is closed")
            if request_id in self._requests:
                raise ValueError(f"request {request_id!r} is already expected")
            overlap = self._claimed.intersection(dst_list)
            if overlap:
                raise ValueError(f"blocks {sorted(overlap)[:8]} are registered to another request")
            request = _Request(request_id, ids, dst_list, num_layers, parts)
            self._requests[request_id] = request
            self._claimed.update(dst_list)
        return ReceiveHandle(self, request)

    def abort(self, request_id: str, reason: str = "aborted by receiver") -> None:
        """Fails the request now; data still in flight for it is discarded, never written."""
        with self._lock:
            request = self._requests.get(request_id)
        if request is not None:
            self._fail(request, reason, notify_sender=True)

    def metrics(self) -> TransferMetrics:
        return self._metrics.snapshot()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._control.join(timeout=5)
        with self._lock:
            links = list(self._links.values())
            requests = list(self._requests.values())
        for link in links:
            self._break_link(link, "receiver closed")
        for request in requests:
            self._fail(request, "receiver closed", notify_sender=False)
        self._router.close(0)
        self._zmq.term()
        self._outbox.close()
        del self._store

    def __enter__(self) -> "KVReceiver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- control thread ---------------------------------------------------------------------

    def _control_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._outbox.fd, zmq.POLLIN)
        check_every = min(self.config.heartbeat_s, 0.25)
        next_check = time.monotonic() + check_every
        while not self._stop.is_set():
            poller.poll(timeout=int(check_every * 1000))
            while True:
                try:
                    frames = self._router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_frames(frames)
            for identity, msg in self._outbox.drain():
                self._reply(identity, msg)
            if time.monotonic() >= next_check:
                self._check_heartbeats()
                next_check = time.monotonic() + check_every

    def _reply(self, identity: bytes, msg: Message) -> None:
        try:
            self._router.send_multipart([identity, encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:  # peer gone or its queue is full: the reply is best effort
            pass

    def _reject(self, identity: bytes, request_id: str | None, reason: str) -> None:
        self._metrics.add(rejected_messages=1)
        self._reply(identity, Error(request_id, reason[:2048]))

    def _on_frames(self, frames: list[bytes]) -> None:
        identity = frames[0]
        if len(frames) != 2:
            self._reject(identity, None, f"expected one frame per message, got {len(frames) - 1}")
            return
        try:
            msg = decode(frames[1])
        except MessageError as exc:
            self._reject(identity, None, f"malformed message: {exc}")
            return
        try:
            self._on_message(identity, msg)
        except Exception as exc:  # a bug here must not take down the receiver
            self._reject(identity, getattr(msg, "request_id", None), f"internal error: {exc!r}")

    def _on_message(self, identity: bytes, msg: Message) -> None:
        if isinstance(msg, Hello):
            self._on_hello(identity, msg)
            return
        with self._lock:
            link = self._links.get(identity)
        if link is None:
            self._reject(identity, getattr(msg, "request_id", None), "unknown peer: send hello first")
            return
        link.last_seen = time.monotonic()
        if isinstance(msg, Ping):
            return
        if isinstance(msg, Begin):
            self._on_begin(link, msg)
        elif isinstance(msg, Chunk):
            self._on_chunk(link, msg)
        elif isinstance(msg, Cancel):
            request, _ = self._bound_request(msg.request_id, link)
            if request is not None:
                # the other parts' senders learn it; the one that cancelled knows
                self._fail(request, f"sender cancelled: {msg.reason}", notify_sender=True,
                           skip=link.identity)
        else:
            self._reject(identity, None, f"unexpected message {type(msg).__name__} from a sender")

    def _on_hello(self, identity: bytes, msg: Hello) -> None:
        if identity != msg.sender_id.encode():
            self._reject(identity, None, "hello.sender_id must equal the socket identity")
            return
        if msg.version != 1:
            self._reject(identity, None, f"unsupported protocol version {msg.version}")
            return
        with self._lock:
            old = self._links.get(identity)
            if old is None and len(self._links) >= self.config.max_peers:
                self._reject(identity, None, "too many peers")
                return
        if old is not None:
            self._break_link(old, "sender re-paired (new epoch)")
        with self._lock:
            epoch = self._epochs.get(identity, -1) + 1
            self._epochs[identity] = epoch
            link = _SenderLink(identity, msg.sender_id, epoch, time.monotonic())
            self._links[identity] = link
        link.thread = threading.Thread(target=self._pair_loop, args=(link,),
                                       name=f"kv-recv-{msg.sender_id}", daemon=True)
        link.thread.start()
        self._metrics.add(pairs_created=1)
        self._reply(identity, Welcome(self.worker_id, self._store.port, epoch))

    def _on_begin(self, link: _SenderLink, msg: Begin) -> None:
        with self._lock:
            request = self._requests.get(msg.request_id)
            link.told.pop(msg.request_id, None)  # chunks from here on are this session's
        part = None
        problem = None
        if request is None:
            problem = "not expected here (unknown, finished or aborted)"
        elif msg.epoch != link.epoch:
            problem = f"stale epoch {msg.epoch} (pair is at {link.epoch})"
        elif msg.dst_block_ids != request.dst_list:
            problem = "dst_block_ids do not match the registered blocks"
        elif msg.num_layers != request.num_layers:
            problem = f"num_layers {msg.num_layers} != registered {request.num_layers}"
        else:
            part = next((p for p in request.parts if p.start == msg.head_start), None)
            bs, _, dim = self._block_shape
            if part is None:
                problem = (f"head_start {msg.head_start} names no part of this request "
                           f"(its head ranges: {[(p.start, p.end) for p in request.parts]})")
            elif msg.dtype != self._dtype or msg.block_shape[0] != bs or msg.block_shape[2] != dim:
                problem = (f"layout {msg.dtype}{msg.block_shape} != receiver's "
                           f"{self._dtype}{[bs, part.width, dim]}")
            elif msg.block_shape[1] != part.width:
                problem = (f"{msg.block_shape[1]} heads sent for part [{part.start}, {part.end}), "
                           f"which has {part.width}")
            elif msg.kv_scales != self._kv_scales:
                problem = (f"KV cache scales differ: the sender's {_brief(msg.kv_scales)} != the receiver's "
                           f"{_brief(self._kv_scales)} (both sides must quantize with the same per-layer scales)")
        if problem is None:
            with request.lock:
                if request.state not in ("expecting", "active"):
                    problem = f"already {request.state}"
                elif part.sender is not None:
                    problem = f"part [{part.start}, {part.end}) is already being sent by another session"
                elif any(p.sender == link.identity and p.epoch == link.epoch for p in request.parts):
                    # Chunks name only the request, so one pair can carry one part of it.
                    problem = "this sender already sends another part of this request"
                else:
                    if request.state == "expecting":
                        request.t_begin = time.monotonic()
                    request.state = "active"
                    part.sender, part.epoch = link.identity, link.epoch
        if problem is not None:
            self._mark_told(link.identity, msg.request_id)
            self._reject(link.identity, msg.request_id, f"begin rejected: {problem}")

    def _on_chunk(self, link: _SenderLink, msg: Chunk) -> None:
        if msg.epoch != link.epoch:
            # Sent on an older pair whose group is gone: nothing was posted for it here.
            self._reject(link.identity, msg.request_id, f"chunk for stale epoch {msg.epoch}")
            return
        problem = None
        if msg.seq != link.next_seq:
            problem = f"chunk seq {msg.seq} != expected {link.next_seq}"
        elif msg.layer_end <= msg.layer_start or msg.shape[0] != msg.layer_end - msg.layer_start \
                or msg.shape[1] != 2:
            problem = f"chunk layers [{msg.layer_start}, {msg.layer_end}) do not match shape {msg.shape}"
        elif msg.nbytes != math.prod(msg.shape) * _itemsize(msg.dtype):
            problem = f"chunk nbytes {msg.nbytes} do not match shape {msg.shape} of {msg.dtype}"
        elif msg.nbytes > self.config.max_message_bytes:
            problem = f"chunk of {msg.nbytes} bytes exceeds max_message_bytes"
        if problem is not None:
            # The sender has posted a send we cannot size: the pair is out of step; re-make it.
            self._reject(link.identity, msg.request_id, problem)
            self._break_link(link, f"protocol error from {link.sender_id}: {problem}")
            return
        link.next_seq += 1
        request, part = self._bound_request(msg.request_id, link)
        problem = None
        if request is None:
            problem = "no active transfer of this request from this sender"
        elif msg.layer_start != part.next_announced_layer or msg.layer_end > request.num_layers:
            problem = (f"layers [{msg.layer_start}, {msg.layer_end}) out of order "
                       f"(next {part.next_announced_layer}, total {request.num_layers})")
        else:
            bs, _, dim = self._block_shape
            if msg.dtype != self._dtype or msg.shape[2:] != [len(request.dst_list), bs, part.width, dim]:
                problem = (f"chunk shape {msg.shape} {msg.dtype} does not match the registered blocks "
                           f"and heads [{part.start}, {part.end})")
        if problem is None:
            part.next_announced_layer = msg.layer_end
            link.jobs.put(_RecvJob(msg, request, part))
            return
        link.jobs.put(_RecvJob(msg, None))  # drain it so the pair stays in step
        if request is not None:
            self._fail(request, f"bad chunk: {problem}", notify_sender=True)
            return
        with self._lock:
            told = msg.request_id in link.told
        if told:
            self._metrics.add(rejected_messages=1)  # the sender already knows: no second reply
            return
        self._mark_told(link.identity, msg.request_id)
        self._reject(link.identity, msg.request_id, f"chunk rejected: {problem}")

    def _bound_request(self, request_id: str, link: _SenderLink) -> tuple[_Request | None, _Part | None]:
        """The active request and its part this pair (sender and epoch) is sending, if any."""
        with self._lock:
            request = self._requests.get(request_id)
        if request is None or request.state != "active":
            return None, None
        for part in request.parts:
            if part.sender == link.identity and part.epoch == link.epoch:
                return request, part
        return None, None

    def _check_heartbeats(self) -> None:
        cutoff = time.monotonic() - self.config.peer_timeout_s
        with self._lock:
            silent = [link for link in self._links.values() if link.last_seen < cutoff]
        for link in silent:
            self._break_link(link, f"sender {link.sender_id} silent for "
                                   f"{self.config.peer_timeout_s:g}s (died?)")

    # ---- pair threads -------------------------------------------------------------------------

    def _pair_loop(self, link: _SenderLink) -> None:
        device = self.kv_cache.device
        stream = None
        if device.type == "cuda":
            torch.cuda.set_device(device)
            stream = torch.cuda.Stream(device)
        timeout = max(self.config.timeout_s, self.config.connect_timeout_s)
        try:
            # A TCPStore client serializes blocking waits, so each pair rendezvouses through its
            # own connection; otherwise one stalled pairing would hold up every other.
            host = "127.0.0.1" if self.config.bind_host in ("0.0.0.0", "::", "*") else self.config.bind_host
            store = TCPStore(host, self._store.port, is_master=False, timeout=timedelta(seconds=timeout))
            prefix = pair_prefix(link.sender_id, self.worker_id, link.epoch)
            group = make_pair_group(store, prefix, RECEIVER_RANK, device, timeout)
        except Exception as exc:
            self._break_link(link, f"pairing with {link.sender_id} failed: {exc}")
            return
        with self._lock:
            link.group = group
            broken = link.broken
        if broken:
            abort_group(group)
            return
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        try:
            with ctx:
                self._serve_pair(link, group, stream)
        except Exception as exc:
            self._break_link(link, f"recv from {link.sender_id} failed: {exc}")

    def _serve_pair(self, link: _SenderLink, group, stream) -> None:
        inflight: collections.deque = collections.deque()
        limit = self.config.max_inflight_messages

        def post(job: _RecvJob) -> None:
            dtype = WIRE_DTYPES[job.chunk.dtype]
            buf = torch.empty(job.chunk.shape, dtype=dtype, device=self.kv_cache.device)
            work = group.recv([buf], 0, job.chunk.seq & 0x7FFFFFFF)
            inflight.append((job, buf, work, time.monotonic() + self.config.timeout_s))

        def post_more() -> bool:
            while len(inflight) < limit:
                try:
                    job = link.jobs.get_nowait()
                except queue.Empty:
                    return True
                if job is None:
                    return False
                post(job)
            return True

        while not link.broken:
            if not inflight:
                try:
                    job = link.jobs.get(timeout=0.1)
                except queue.Empty:
                    continue
                if job is None:
                    return
                post(job)
            if not post_more():
                return
            job, buf, work, deadline = inflight.popleft()
            wait_work(work, deadline, stream is not None, on_idle=post_more)
            self._metrics.add(messages_received=1)
            if job.target is not None:
                self._land(job.target, job.part, job.chunk, buf, stream)

    def _land(self, request: _Request, part: _Part, chunk: Chunk, buf: torch.Tensor, stream) -> None:
        # Parts of one request land from several pair threads; the request's lock orders them
        # against each other and against `_fail`, so nothing is written after a failure.
        with request.lock:
            if request.state != "active":
                return  # aborted while in flight: discard
            scatter_layers(buf, self.kv_cache, chunk.layer_start, chunk.layer_end, request.dst_ids,
                           (part.start, part.end))
            if stream is not None:
                stream.synchronize()
            part.layers_landed = chunk.layer_end
            request.bytes_landed += chunk.nbytes
            part_done = part.layers_landed == request.num_layers
            complete = request.layers_landed == request.num_layers
            if complete:
                request.state = "ok"
        self._metrics.add(bytes_received=chunk.nbytes)
        if complete:
            self._metrics.add(transfers_ok=1, transfer_seconds=time.monotonic() - request.t_begin)
            self._release(request)
            request.set_finished()
        if part_done:
            # That sender's session is over; the request may still wait for other parts.
            self._outbox.put((part.sender, Done(request.request_id)))

    # ---- failure ------------------------------------------------------------------------------

    def _release(self, request: _Request) -> None:
        with self._lock:
            if self._requests.get(request.request_id) is request:
                del self._requests[request.request_id]
                self._claimed.difference_update(request.dst_list)

    def _fail(self, request: _Request, reason: str, notify_sender: bool,
              skip: bytes | None = None) -> None:
        """Fails the whole request; with `notify_sender`, every part's sender but `skip` is told."""
        with request.lock:
            if request.state in ("ok", "failed"):
                return
            request.state = "failed"
            request.error = TransferError(request.request_id, reason)
            senders = request.senders()
        self._release(request)
        self._metrics.add(transfers_failed=1)
        request.set_finished()
        for identity in senders:
            self._mark_told(identity, request.request_id)  # `skip` (it cancelled) knows too
            if notify_sender and identity != skip:
                self._outbox.put((identity, Error(request.request_id, reason[:2048])))

    def _mark_told(self, identity: bytes, request_id: str) -> None:
        with self._lock:
            link = self._links.get(identity)
            if link is None:
                return
            link.told[request_id] = None
            link.told.move_to_end(request_id)
            if len(link.told) > _MAX_TOLD:
                link.told.popitem(last=False)  # forgetting one costs at most a redundant reply

    def _break_link(self, link: _SenderLink, reason: str) -> None:
        with self._lock:
            if link.broken:
                return
            link.broken = True
            if self._links.get(link.identity) is link:
                del self._links[link.identity]
            group = link.group
            # A part this pair already delivered in full does not need it any more.
            bound = [r for r in self._requests.values()
                     if any(p.sender == link.identity and p.epoch == link.epoch
                            and p.layers_landed < r.num_layers for p in r.parts)]
        self._metrics.add(pairs_broken=1)
        for request in bound:
            self._fail(request, reason, notify_sender=True)
        link.jobs.put(None)
        abort_group(group)


def _parts(head_ranges, num_heads: int) -> list[_Part]:
    """`expect`'s head_ranges as parts; they must tile [0, num_heads) in order."""
    if head_ranges is None:
        return [_Part(0, num_heads)]
    if isinstance(head_ranges, (str, bytes)) or not isinstance(head_ranges, Sequence):
        raise ValueError(f"head_ranges must be a sequence of (start, end) pairs, got {head_ranges!r}")
    ranges = []
    for r in head_ranges:
        pair = tuple(r) if isinstance(r, (tuple, list)) else ()
        if len(pair) != 2 or any(type(h) is not int for h in pair):
            raise ValueError(f"head_ranges must be (start, end) pairs of ints, got {r!r}")
        ranges.append(pair)
    if not ranges:
        raise ValueError("head_ranges must not be empty")
    for start, end in ranges:
        if start >= end:
            raise ValueError(f"head range ({start}, {end}) is empty")
        if start < 0:
            raise ValueError(f"head range ({start}, {end}) is outside [0, {num_heads})")
    if ranges != sorted(ranges):
        raise ValueError(f"head_ranges {ranges} must be sorted and disjoint")
    covered = 0  # heads [0, covered) are in the ranges so far
    for start, end in ranges:
        if start < covered:
            raise ValueError(f"head_ranges {ranges} must be sorted and disjoint: ({start}, {end}) "
                             f"overlaps the range before it")
        if start > covered:
            raise ValueError(f"head_ranges {ranges} must cover [0, {num_heads}) exactly: heads "
                             f"[{covered}, {start}) are in no range")
        covered = end
    if covered != num_heads:
        raise ValueError(f"head_ranges {ranges} must cover [0, {num_heads}) exactly (this cache's heads), "
                         f"they end at {covered}")
    return [_Part(start, end) for start, end in ranges]


def _listen(host: str, port: int) -> tuple[int, int]:
    """A listening TCP socket on exactly `host`:`port` (0: a free port); returns (fd, port)."""
    family, _, _, _, address = socket.getaddrinfo(None if host == "*" else host, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(512)
        port = sock.getsockname()[1]
        return sock.detach(), port
    except BaseException:
        sock.close()
        raise


def _call(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # a caller's callback must not take down a receiver thread
        pass


def _brief(scales: list[float]) -> str:
    return f"[{', '.join(f'{s:g}' for s in scales[:4])}{', ...' if len(scales) > 4 else ''}] ({len(scales)})"


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=WIRE_DTYPES[dtype]).element_size()
