"""Progress lines for long stages: what is done, how fast, and when it ends, at least every `every_s` seconds.

    with Progress("reference log-probs", total=400, unit="pairs") as bar:
        for batch in batches:
            ...
            bar.update(len(batch), tokens=n_tokens)
    # [progress] reference log-probs: 160/400 pairs (40%), 6.1 pairs/s, 1302 tok/s, 0m26s elapsed, ETA 0m39s

A heartbeat thread prints the line even while one long call (a vLLM batch, a big eval batch) has not returned, so a
stage is never silent for longer than `every_s` (default 20 s; $DPO_PROGRESS_S overrides). Lines go to stderr,
start with "[progress]", and are what pipeline.py relays from its jobs' logs. The newline-terminated lines read well
in a Slurm log file, unlike a tqdm bar's carriage returns.
"""
from __future__ import annotations

import os
import sys
import threading
import time

PREFIX = "[progress]"


def clock(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes}m{s:02d}s"


def default_every_s() -> float:
    try:
        return max(0.05, float(os.environ.get("DPO_PROGRESS_S", "20")))
    except ValueError:
        return 20.0


_WRITE = threading.Lock()  # one whole line at a time, whichever thread prints


def _to_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class Progress:
    def __init__(self, label: str, total: int, unit: str = "items", every_s: float | None = None, done: int = 0,
                 log=None, enabled: bool = True):
        self.label, self.total, self.unit = label, total, unit
        self.every_s = default_every_s() if every_s is None else max(0.05, every_s)
        self.done, self.start_done, self.tokens, self.note = done, done, 0, ""
        self.started = time.time()
        self.log = log or _to_stderr
        self.enabled = enabled and total > 0
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._last_print = self.started
        self._thread = None
        if self.enabled:
            self._thread = threading.Thread(target=self._beat, daemon=True, name=f"progress {label}")
            self._thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(print_final=exc[0] is None)

    def update(self, n: int = 1, tokens: int = 0, note: str = "") -> None:
        with self._lock:
            self.done += n
            self.tokens += tokens
            self.note = note or self.note
        self._print_if_due()

    def line(self) -> str:
        with self._lock:
            done, tokens, note = min(self.done, self.total), self.tokens, self.note
        spent = time.time() - self.started
        parts = [f"{done}/{self.total} {self.unit} ({100 * done / self.total:.0f}%)"]
        new = done - self.start_done
        if new > 0 and spent > 0:
            rate = new / spent
            parts.append(f"{rate:.2f} {self.unit}/s" if rate < 10 else f"{rate:.0f} {self.unit}/s")
            if tokens:
                parts.append(f"{tokens / spent:.0f} tok/s")
        parts.append(f"{clock(spent)} elapsed")
        if 0 < new and done < self.total:
            parts.append(f"ETA {clock((self.total - done) * spent / new)}")
        elif done < self.total:
            parts.append("ETA after the first batch")
        return f"{PREFIX} {self.label}: " + ", ".join(parts) + (f"; {note}" if note else "")

    def print(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._last_print = time.time()
        line = self.line()
        with _WRITE:
            self.log(line)

    def _print_if_due(self) -> None:
        with self._lock:  # decided and claimed at once: the heartbeat and update() never both print
            due = time.time() - self._last_print >= self.every_s
            if due:
                self._last_print = time.time()
        if due and self.enabled:
            line = self.line()
            with _WRITE:
                self.log(line)

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.every_s)):
            self._print_if_due()

    def close(self, print_final: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if print_final and time.time() - self.started >= self.every_s:
                self.print()  # the closing line of anything long enough to have been reported
