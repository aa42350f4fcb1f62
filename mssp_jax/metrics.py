"""Run outputs: JSONL metrics, TensorBoard events, a one-line progress display, the loss curve.

Only process 0 writes (`enabled`); other processes get a writer whose methods do nothing. The JSONL
file is appended to, so a restarted run continues it; steps repeated after a restart (between the
last checkpoint and the kill) appear twice and the later record wins in `read` and the plot.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


def _scalar(value: Any) -> float:
    return float(np.asarray(value))


class Writer:
    """Writes {'kind': 'train' | 'eval', 'step': int, metric: float, ...} records."""

    def __init__(self, workdir: str | Path, total_steps: int, enabled: bool | None = None):
        self.workdir = Path(workdir)
        self.total_steps = total_steps
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._rate_mark: tuple[float, int] | None = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.workdir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(self.workdir / METRICS_FILE, "a")
            self.tensorboard = SummaryWriter(str(self.workdir / "tensorboard"))

    def write(self, kind: str, step: int, values: dict[str, Any]) -> dict[str, float]:
        """Records `values` (scalars) for `step`; returns them as floats."""
        record = {k: _scalar(v) for k, v in values.items()}
        if self.enabled:
            self.jsonl.write(json.dumps({"kind": kind, "step": step, **record}) + "\n")
            self.jsonl.flush()
            for name, value in record.items():
                self.tensorboard.add_scalar(f"{kind}/{name}", value, step)
        return record

    def rates(self, step: int, tokens_per_step: int) -> dict[str, float]:
        """steps/s and tokens/s since the previous call (empty on the first call)."""
        now, mark = time.perf_counter(), self._rate_mark
        self._rate_mark = (now, step)
        if mark is None or step <= mark[1]:
            return {}
        steps_per_s = (step - mark[1]) / (now - mark[0])
        return {"steps_per_s": steps_per_s, "tokens_per_s": steps_per_s * tokens_per_step}

    def progress(self, step: int, record: dict[str, float]) -> None:
        """One status line: step, loss, rate and ETA (rewritten in place on a terminal)."""
        if not self.enabled:
            return
        line = f"step {step}/{self.total_steps}  loss {record.get('loss', float('nan')):.4f}"
        if "steps_per_s" in record:
            eta = (self.total_steps - step) / record["steps_per_s"]
            line += (f"  {record['steps_per_s']:.1f} steps/s  {record['tokens_per_s']:.0f} tok/s"
                     f"  ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        tty = sys.stdout.isatty()
        print(("\r" + line.ljust(100)) if tty else line, end="" if tty else "\n", flush=True)

    def close(self) -> None:
        if self.enabled:
            if sys.stdout.isatty():
                print()
            self.jsonl.close()
            self.tensorboard.close()


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


def plot_loss_curve(workdir: str | Path) -> Path:
    """Train and eval loss against step, from the JSONL, as a PNG in the workdir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in (("train", "-"), ("eval", "o-")):
        records = read(workdir, kind)
        if records:
            ax.plot(list(records), [r["loss"] for r in records.values()], style, label=kind)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    path = Path(workdir) / LOSS_CURVE_FILE
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
