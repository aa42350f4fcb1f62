"""Run outputs: JSONL metrics, TensorBoard events, progress and eval lines, the loss curve.

Only process 0 writes (`enabled`); other processes get a writer whose methods do nothing. A
restarted run repeats the steps between its checkpoint and the interruption, so a training
writer opened with `resume_from=step` first drops the records after that step from the JSONL and
starts TensorBoard with ``purge_step=step + 1`` (TensorBoard hides the earlier run's events from
there on): every step appears once.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


def _scalar(value: Any) -> float:
    return float(np.asarray(value))


def truncate(workdir: str | Path, last_step: int) -> None:
    """Drops the JSONL records of steps after `last_step`, and a last line cut short by a kill
    (rewritten atomically)."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.endswith("\n") and line.strip() and json.loads(line)["step"] <= last_step]
    partial = path.with_suffix(".jsonl.tmp")
    partial.write_text("".join(kept))
    os.replace(partial, path)


class Writer:
    """Writes {'kind': 'train' | 'eval', 'step': int, metric: float, ...} records."""

    def __init__(self, workdir: str | Path, total_steps: int, *, resume_from: int | None = None,
                 enabled: bool | None = None):
        """`resume_from`: the step a training run starts after (0 for a fresh run); records of
        later steps are dropped. None (evaluation): append only."""
        self.workdir = Path(workdir)
        self.total_steps = total_steps
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.workdir.mkdir(parents=True, exist_ok=True)
            if resume_from is not None:
                truncate(self.workdir, resume_from)
            self.jsonl = open(self.workdir / METRICS_FILE, "a")
            self.tensorboard = SummaryWriter(  # a new file per writer, later ones sort after
                str(self.workdir / "tensorboard"), filename_suffix=f".{time.time_ns()}",
                purge_step=None if resume_from is None else resume_from + 1)

    def write(self, kind: str, step: int, values: dict[str, Any]) -> dict[str, float]:
        """Records `values` (scalars) for `step`; returns them as floats."""
        record = {k: _scalar(v) for k, v in values.items()}
        if self.enabled:
            self.jsonl.write(json.dumps({"kind": kind, "step": step, **record}) + "\n")
            self.jsonl.flush()
            for name, value in record.items():
                self.tensorboard.add_scalar(f"{kind}/{name}", value, step)
        return record

    def _line(self, text: str, *, keep: bool) -> None:
        """Prints `text`; on a terminal the progress line is rewritten in place (`keep=False`)."""
        if not self.enabled:
            return
        if sys.stdout.isatty():
            print("\r" + text.ljust(100), end="\n" if keep else "", flush=True)
        else:
            print(text, flush=True)

    def progress(self, step: int, record: dict[str, float]) -> None:
        """The status line: step, loss (and accuracy), throughput and ETA."""
        line = f"step {step}/{self.total_steps}  loss {record.get('loss', float('nan')):.4f}"
        if "accuracy" in record:
            line += f"  accuracy {record['accuracy']:.3f}"
        if "steps_per_s" in record:
            eta = (self.total_steps - step) / record["steps_per_s"]
            unit = "tokens" if "tokens_per_s" in record else "examples"
            line += (f"  {record['steps_per_s']:.1f} steps/s"
                     f"  {record[unit + '_per_s']:.0f} {unit}/s"
                     f"  ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        self._line(line, keep=False)

    def report(self, kind: str, step: int, record: dict[str, float]) -> None:
        """A kept line with an evaluation's loss (and accuracy), printed when it is computed;
        every metric is in the JSONL."""
        line = f"{kind} at step {step}: loss {record['loss']:.4f}"
        if "accuracy" in record:
            line += f"  accuracy {record['accuracy']:.4f}"
        self._line(line, keep=True)

    def close(self) -> None:
        if self.enabled:
            if sys.stdout.isatty():
                print()
            self.jsonl.close()
            self.tensorboard.close()


class Throughput:
    """Steps/s and items/s (tokens or examples) since the last `rates` call, not counting time
    spent in `pause()` (evaluations, checkpoints), so an ETA from them excludes the pauses."""

    def __init__(self, items_per_step: int, unit: str,
                 clock: Callable[[], float] = time.perf_counter):
        self.items_per_step, self.unit, self.clock = items_per_step, unit, clock
        self._mark: tuple[float, int] | None = None
        self._paused = 0.0

    def start(self, step: int) -> None:
        """Counts from the end of `step` (call it after the compiled first step has finished)."""
        self._mark, self._paused = (self.clock(), step), 0.0

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        begin = self.clock()
        try:
            yield
        finally:
            self._paused += self.clock() - begin

    def rates(self, step: int) -> dict[str, float]:
        """Rates over the steps since the last call (empty before `start` or with no new step)."""
        if self._mark is None or step <= self._mark[1]:
            return {}
        (begin, first), now, paused = self._mark, self.clock(), self._paused
        self._mark, self._paused = (now, step), 0.0
        steps_per_s = (step - first) / max(now - begin - paused, 1e-9)
        return {"steps_per_s": steps_per_s, f"{self.unit}_per_s": steps_per_s * self.items_per_step}


def read(workdir: str | Path, kind: str) -> dict[int, dict[str, float]]:
    """step -> record of `kind` from the workdir's JSONL (the latest record of a repeated step)."""
    path = Path(workdir) / METRICS_FILE
    records = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.pop("kind") == kind:
                records[r.pop("step")] = r
    return dict(sorted(records.items()))


def loss_curve_figure(workdir: str | Path, title: str = "") -> Any:
    """Train and eval loss against step, from the JSONL, as a matplotlib Figure. The y axis is
    logarithmic when the losses span more than a decade; tick labels are plain numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    losses = []
    for kind, style in (("train", "-"), ("eval", "o-")):
        records = read(workdir, kind)
        if records:
            ax.plot(list(records), [r["loss"] for r in records.values()], style, label=kind)
            losses += [r["loss"] for r in records.values()]
    positive = [x for x in losses if np.isfinite(x) and x > 0]
    if positive and max(positive) > 10 * min(positive):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    if losses:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_loss_curve(workdir: str | Path, title: str = "") -> Path:
    """`loss_curve_figure` saved as a PNG in the workdir."""
    import matplotlib.pyplot as plt

    fig = loss_curve_figure(workdir, title)
    path = Path(workdir) / LOSS_CURVE_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
