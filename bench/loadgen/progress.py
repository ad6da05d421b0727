"""The live progress line on stderr: requests sent/done/failed, in flight, tokens, elapsed.

On a terminal it redraws one line; otherwise (a log file, CI) it prints a line every few
seconds so logs stay readable."""
from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class Progress:
    label: str
    total_requests: int | None
    duration_s: float | None
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    enabled: bool = True
    sent: int = 0
    done: int = 0
    failed: int = 0
    output_tokens: int = 0
    started_at: float = field(default_factory=time.perf_counter)

    @property
    def in_flight(self) -> int:
        return self.sent - self.done

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started_at
        if self.total_requests is not None:
            filled = int(20 * min(self.done / max(self.total_requests, 1), 1.0))
            bar = f"[{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total_requests}"
        else:
            bar = f"{self.done} done"
        bound = f"/{self.duration_s:g}s" if self.duration_s is not None else "s"
        rate = self.output_tokens / elapsed if elapsed > 0 else 0.0
        return (f"{self.label} {bar} sent {self.sent} in-flight {self.in_flight} failed {self.failed} "
                f"out {rate:.0f} tok/s {elapsed:.1f}{bound}")

    async def run(self, interval_s: float = 0.5) -> None:
        """Redraw until cancelled."""
        if not self.enabled:
            return
        tty = self.stream.isatty()
        last_print = 0.0
        try:
            while True:
                await asyncio.sleep(interval_s)
                if tty:
                    self.stream.write("\r\x1b[2K" + self.line())
                    self.stream.flush()
                elif time.perf_counter() - last_print >= 5.0:
                    self.stream.write(self.line() + "\n")
                    last_print = time.perf_counter()
        finally:
            self.stream.write(("\r\x1b[2K" if tty else "") + self.line() + "\n")
            self.stream.flush()
