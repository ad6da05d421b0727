"""Per-step trace of an engine run: what each step computed and how long it took, on the host and
on the device. Benchmark instrumentation, not engine code: it wraps `ModelRunner.execute`.

For each step it records the step's shape (decode sequences, prompt tokens, the decode sequences'
context) and two times:
- host: how long `execute` took to prepare and enqueue the step. It is meant not to wait for the
  device, but it can: the eager 8192-token steps of the H100 runs show 100-200 ms here, about their
  device time. The cause was not examined; a full launch queue or an allocator sync would do it;
- device: CUDA-event time from just before the step's first kernel to just after its last
  forward kernel. Events do not synchronise, so the run is not slowed. When the host is slower
  than the device, the device time includes the gaps where kernels waited to be launched.

`summary()` groups the steps by kind (decode-only, mixed) and size, so a run's wall time can be
read as the sum of its parts. On a CPU device only host times are recorded.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class StepRecord:
    num_decode: int  # sequences computing one token
    num_prefill_seqs: int  # sequences computing a prompt chunk
    prefill_tokens: int
    decode_context: int  # sum of the decode sequences' context lengths (KV read per layer, tokens)
    host_s: float
    start: object = None  # torch.cuda.Event
    end: object = None

    @property
    def kind(self) -> str:
        return "decode" if self.prefill_tokens == 0 else ("prefill" if self.num_decode == 0 else "mixed")

    def device_s(self) -> float | None:
        return None if self.start is None else self.start.elapsed_time(self.end) / 1e3


@dataclass
class StepTracer:
    runner: object
    records: list[StepRecord] = field(default_factory=list)
    _orig: object = None

    def __enter__(self) -> "StepTracer":
        self._orig = self.runner.execute
        cuda = self.runner.device.type == "cuda"

        def traced(sched, prev_tokens=None, layer_done=None):
            # A decode item computes one token past its prompt (a 1-token prompt chunk is prefill).
            decode = [it for it in sched.scheduled
                      if it.num_new_tokens == 1 and it.seq.num_computed_tokens >= it.seq.num_prompt_tokens]
            rec = StepRecord(
                num_decode=len(decode),
                num_prefill_seqs=len(sched.scheduled) - len(decode),
                prefill_tokens=sum(it.num_new_tokens for it in sched.scheduled) - len(decode),
                decode_context=sum(it.seq.num_computed_tokens + 1 for it in decode),
                host_s=0.0,
            )
            if cuda:
                rec.start, rec.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                rec.start.record()
            t = time.perf_counter()
            out = self._orig(sched, prev_tokens, layer_done)
            rec.host_s = time.perf_counter() - t
            if cuda:
                rec.end.record()
            self.records.append(rec)
            return out

        self.runner.execute = traced
        return self

    def __exit__(self, *exc) -> None:
        self.runner.execute = self._orig

    def summary(self, wall_s: float) -> dict:
        """Steps grouped by kind and size: count, host and device seconds, tokens. `wall_s` is the
        run's wall time; `outside_forward_s` is what the steps' forward times leave of it (sampling,
        and the device waiting on the host)."""
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize()

        def upto(value: int, edges: tuple[int, ...]) -> str:
            # The last bucket is open: an engine may run more sequences or tokens than the edges.
            return next((f"<={e}" for e in edges if value <= e), f">{edges[-1]}")

        def bucket(r: StepRecord) -> str:
            if r.kind == "decode":
                return "decode" + upto(r.num_decode, (1, 8, 32, 64, 128, 192, 256, 512))
            return f"{r.kind} prompt" + upto(r.prefill_tokens, (256, 512, 1024, 2048, 4096, 8192))

        groups: dict[str, dict] = {}
        for r in self.records:
            g = groups.setdefault(bucket(r), dict(steps=0, host_s=0.0, device_s=0.0, decode_tokens=0,
                                                  prefill_tokens=0, decode_context=0))
            g["steps"] += 1
            g["host_s"] += r.host_s
            g["device_s"] += r.device_s() or 0.0
            g["decode_tokens"] += r.num_decode
            g["prefill_tokens"] += r.prefill_tokens
            g["decode_context"] += r.decode_context
        for g in groups.values():
            g["device_ms_per_step"] = 1e3 * g["device_s"] / g["steps"]
            g["host_ms_per_step"] = 1e3 * g["host_s"] / g["steps"]
        device_total = sum(g["device_s"] for g in groups.values())
        return dict(steps=len(self.records), wall_s=wall_s, device_s=device_total,
                    host_s=sum(g["host_s"] for g in groups.values()),
                    outside_forward_s=wall_s - device_total if device_total else None,
                    groups=dict(sorted(groups.items())))

    def steps(self) -> list[list]:
        """Every step as [decode seqs, prompt tokens, decode context, host ms, device ms]."""
        return [[r.num_decode, r.prefill_tokens, r.decode_context, round(r.host_s * 1e3, 3),
                 None if r.start is None else round(r.device_s() * 1e3, 3)] for r in self.records]
