"""What ``ccsr upscale`` tells the user while a batch runs, and what it reports at the end.

Each file is announced as "file N of M" with an estimate for the rest of the batch; the network evaluations
are a tqdm bar on a terminal and plain lines (one per tenth of the work) anywhere else, so a log holds no bar
redraws; the stage after sampling (VAE decode, then encode) is named instead of leaving a finished bar silent;
errors get their own line and are listed again in the summary; ``results`` feeds ``--json``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TextIO

Status = Literal["done", "skipped", "failed"]


@dataclass
class FileResult:
    """One input's outcome: what ``--json`` writes per file."""

    input: str
    output: str
    status: Status
    error: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    seconds: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class FileProgress:
    """Progress of one file: network evaluations, then the decode + encode stage."""

    def __init__(self, report: BatchReport, label: str):
        self.report, self.label = report, label
        self.bar: Any = None
        self.shown = -1  # last tenth printed in plain mode
        self.t0 = time.perf_counter()

    def evaluations(self, done: int, total: int) -> None:
        if self.report.quiet:
            return
        if self.report.tty:
            self._bar_update(done, total)
        else:
            tenth = done * 10 // max(total, 1)
            if tenth != self.shown:  # an out-of-memory re-plan starts again from 0 with a new total
                self.shown = tenth
                self.report.line(f"  sampling: {done}/{total} evaluations ({time.perf_counter() - self.t0:.1f} s)")
        if done == total:
            self.stage("VAE decode and encode")

    def _bar_update(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.label, unit="eval", leave=False, file=self.report.stream,
                            dynamic_ncols=True)
        if self.bar.total != total:  # an out-of-memory retry re-planned with more tiles
            self.bar.reset(total)
        self.bar.update(done - self.bar.n)

    def stage(self, name: str) -> None:
        if self.report.quiet:
            return
        if self.bar is not None:
            self.bar.set_description_str(f"{self.label} {name}")
            self.bar.refresh()
        else:
            self.report.line(f"  {name}")

    def log(self, message: str) -> None:
        if not self.report.quiet:
            self.report.line(f"  {message}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class BatchReport:
    """Counts, estimates and prints a batch in which ``total`` files are upscaled (to ``stream``, stderr by
    default); skipped and refused files are recorded too, without a number."""

    def __init__(self, total: int, *, quiet: bool = False, stream: TextIO | None = None, tty: bool | None = None):
        self.total, self.quiet = total, quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.results: list[FileResult] = []
        self.current: FileProgress | None = None
        self._work_done = 0.0  # output pixels of the files upscaled so far, and their seconds
        self._work_seconds = 0.0

    def line(self, text: str) -> None:
        """One line that never lands inside a bar."""
        if self.current is not None and self.current.bar is not None:
            self.current.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def eta(self, remaining_pixels: int) -> float | None:
        """Seconds left for ``remaining_pixels`` of output, at the rate of the files finished so far."""
        if self._work_done <= 0:
            return None
        return remaining_pixels * self._work_seconds / self._work_done

    def begin(self, index: int, src: str, dst: str, remaining_pixels: int) -> FileProgress:
        """Announce file ``index`` (1-based); ``remaining_pixels``: output pixels of this and the later files."""
        label = f"[{index}/{self.total}]"
        if not self.quiet:
            eta = self.eta(remaining_pixels)
            left = "" if eta is None else f" (about {_duration(eta)} left for the batch)"
            self.line(f"{label} {src} -> {dst}{left}")
        self.current = FileProgress(self, label)
        return self.current

    def end(self, result: FileResult, output_pixels: int = 0) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None
        self.results.append(result)
        if result.status == "done":
            self._work_done += output_pixels
            self._work_seconds += result.seconds or 0.0
            if not self.quiet:
                self.line(f"  done: {result.width}x{result.height} seed={result.seed} {result.seconds:.1f} s")
        elif result.status == "failed":
            self.line(f"ccsr: error: {result.input}: {result.error}")
        elif not self.quiet:
            self.line(f"skip {result.input} ({result.error})")

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.results) for s in ("done", "skipped", "failed")}

    def summary(self) -> None:
        """The end of a batch of several files: counts, then every failure again so none is lost among progress
        lines (a single file's outcome is its own last line)."""
        c = self.counts()
        if len(self.results) < 2 or (self.quiet and not c["failed"]):
            return
        self.line(f"{c['done']} done, {c['skipped']} skipped, {c['failed']} failed")
        for r in self.results:
            if r.status == "failed":
                self.line(f"  failed: {r.input}: {r.error}")

    def to_json(self) -> dict[str, Any]:
        return {"files": [asdict(r) for r in self.results], "summary": {"files": len(self.results), **self.counts()}}


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
