"""The paper's four LR-transfer claims judged on finished sweeps, one table per claim.

(a) MSSP's optimal LR does not move with scale; (b) MSSP's loss improves at every larger scale;
(c) muP does not reliably do both (its optimum drifts, its loss is not monotone, or it learns
later at larger scale); (d) SP's optimal LR drifts. A sweep directory is named
`<regime>-<optimizer>-<constants>-<data>[-<variant>]` (experiments/x16_campaign.sh; variant: soft)
and holds the cells and summary that `run.py sweep` writes; runs in its extension folders
(`sweep.extensions`: e.g. an LR grid widened where an optimum sat on the edge) join its cells.
Error bars come from the seeds: the drift of each seed's own optimum (its range over seeds) and
the seed std of the loss at the optimum.

    python3 -m experiments.claims --figures docs/figures/x16 --update docs/RESULTS.md
    python3 -m experiments.claims --results experiments/results/transformer_x8 \
        --figures docs/figures/transformer_x8 --update docs/RESULTS.md --block claims-transformer
"""

from __future__ import annotations

import collections
import glob
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from absl import app, flags

from experiments import plots, summary, sweep

TRANSFER_STEPS = 1  # an optimum moving at most one grid step counts as transferring
PARAMS = ("mssp", "mup", "sp")
DOCS = "docs"  # figure links are relative to where RESULTS.md lives


@dataclass(frozen=True)
class Sweep:
    """One finished (regime, optimizer, constants, data) sweep: its summary and raw cells."""
    regime: str
    optimizer: str
    constants: str
    data: str
    table: dict[str, Any]  # summary.summarize output for the optimizer
    cells: dict[str, list[dict[str, Any]]]  # parameterization -> LR cells sorted by scale
    hours: WallTime  # on the 2-core machine
    folder: str

    @property
    def complete(self) -> bool:
        """Every parameterization has reached the same scales and has run one LR grid at all of
        them (a running sweep, or one whose grid-widening round is under way, has not: a drift
        measured across unequal grids can overstate the true one)."""
        def grids(cells: list[dict[str, Any]]) -> set[tuple[float, ...]]:
            return {tuple(sorted({r["lr"] for r in c["runs"]})) for c in cells}

        return (len({tuple(f["scales"]) for f in self.table.values()}) == 1
                and all(len(grids(c)) == 1 for c in self.cells.values()))

    @property
    def name(self) -> str:
        return f"{self.regime} {self.optimizer} {self.constants} {self.data}"


def load(results: str) -> list[Sweep]:
    """Every sweep under `results` with at least two finished scales of sp, mup and mssp."""
    sweeps = []
    for path in sorted(glob.glob(os.path.join(results, "*-*-*-*/"))):
        regime, optimizer, constants, data, *variant = os.path.basename(path.rstrip("/")).split("-")
        data = " ".join([data, *variant])  # e.g. 'mnist1d soft': a routing variant of the sweep
        sources = sweep.run_sources(path)
        records = [sweep.with_runs(json.load(open(f)), sources)
                   for f in glob.glob(os.path.join(path, "cells", "lr-*.json"))]
        table = summary.summarize(records).get(optimizer, {})
        if not all(len(table.get(p, {}).get("scales", ())) >= 2 for p in PARAMS):
            continue
        cells = {p: sorted((r for r in records if r["cell"]["parameterization"] == p),
                           key=lambda r: r["cell"]["scale"]) for p in table}
        sweeps.append(Sweep(regime, optimizer, constants, data, table, cells, wall_hours(path),
                            path.rstrip("/")))
    order = {"II": 0, "III": 1, "I": 2}
    return sorted(sweeps, key=lambda s: (s.data, s.constants, order[s.regime], s.optimizer))


def seed_drifts(cells: list[dict[str, Any]]) -> list[int]:
    """Each seed's own drift: grid steps between its lowest and highest optimal LR over scales
    (a diverged run never is an optimum)."""
    tables = summary.family_tables(cells)[1]  # [lr, seed] per scale, on one grid
    drifts = []
    for s in range(min(t.shape[1] for t in tables)):
        idx = [int(np.nanargmin(t[:, s])) for t in tables if not np.isnan(t[:, s]).all()]
        drifts.append(max(idx) - min(idx) if idx else 0)
    return drifts


def half_time(cells: list[dict[str, Any]], lr: float) -> float:
    """Steps until the seed-mean training loss at `lr` has made half of its total decrease
    (curve logged as 10-step means): how late learning starts."""
    curves = np.array([r["curve_10"] for r in cells["runs"] if r["lr"] == lr and not r["diverged"]])
    if not len(curves):
        return float("nan")
    curve = curves.mean(0)
    target = curve[0] - 0.5 * (curve[0] - curve.min())
    return float(10 * (np.argmax(curve <= target) + 1))


def delay(cells: list[dict[str, Any]], family: dict[str, Any]) -> float:
    """Half-time at the largest scale over half-time at the base, each at its own optimum."""
    first, last = cells[0], cells[-1]
    return half_time(last, family["opt_lr"][-1]) / half_time(first, family["opt_lr"][0])


def reversals(family: dict[str, Any]) -> int:
    """Scale steps where the best loss rises by more than the two seed stds combined."""
    best, std = np.array(family["best_loss"]), np.array(family["best_loss_std"])
    rise = np.diff(best) - np.hypot(std[1:], std[:-1])
    return int((rise > 0).sum())


@dataclass(frozen=True)
class WallTime:
    """A sweep's wall time on this machine, over the cells whose time is known."""
    hours: float
    timed: int  # cells whose time is known
    cells: int

    def __str__(self) -> str:
        if not self.timed:
            return "time not recorded"
        part = "" if self.timed == self.cells else f" for {self.timed} of {self.cells} cells"
        return f"{self.hours:.1f} h{part}"


def wall_hours(path: str, gap_s: float = 3600.0, stamp_count: int = 3) -> WallTime:
    """A cell's time is its recorded `wall_s`; for an older cell without one, the gap since the
    previous cell's file time, unless that gap is over `gap_s` (the campaign was stopped between
    sessions) or either file time is a checkout stamp (`stamp_count` or more files with the same
    second: results checked out again lose their times). The first cell by file time has no gap.
    Cells of the sweep's extensions (`sweep.extensions`) count too."""
    files = [f for d in [path, *sweep.extensions(path)]
             for f in glob.glob(os.path.join(d, "cells", "*.json"))]
    recorded = {f: json.load(open(f)).get("wall_s") for f in files}
    mtimes = {f: int(os.path.getmtime(f)) for f in files}
    counts = collections.Counter(mtimes.values())
    ordered = sorted(files, key=mtimes.get)
    seconds, timed = 0.0, 0
    for prev, f in zip([None] + ordered[:-1], ordered):
        if recorded[f] is not None:
            seconds, timed = seconds + recorded[f], timed + 1
        elif prev is not None and counts[mtimes[f]] < stamp_count and \
                counts[mtimes[prev]] < stamp_count and mtimes[f] - mtimes[prev] < gap_s:
            seconds, timed = seconds + mtimes[f] - mtimes[prev], timed + 1
    return WallTime(seconds / 3600, timed, len(files))


def _lrs(f: dict[str, Any]) -> str:
    return ", ".join("div" if x is None else f"{x:.3g}" + ("*" if e else "")
                     for x, e in zip(f["opt_lr"], f["opt_at_grid_edge"]))


def _losses(f: dict[str, Any]) -> str:
    return ", ".join(f"{m:.4f}±{s:.4f}" for m, s in zip(f["best_loss"], f["best_loss_std"]))


def _drift(f: dict[str, Any], cells: list[dict[str, Any]]) -> str:
    d = seed_drifts(cells)
    return f"{f['drift_steps']} (seeds {min(d)}-{max(d)})"


def _spacing(f: dict[str, Any]) -> str:
    return f"x{f['lrs'][1] / f['lrs'][0]:.3g}"


def _row(s: Sweep, *cols: str) -> str:
    scales = s.table[PARAMS[0]]["scales"]
    return (f"| {s.regime} | {s.optimizer} | {s.constants} | {s.data} | x{scales[0]}-x{scales[-1]} "
            f"| {' | '.join(cols)} |")


HEAD = "| regime | opt | constants | data | range | "


def transfer_table(sweeps: list[Sweep], param: str, drifts: bool) -> str:
    """Claims (a) and (d): where the optimum sits per scale and how far it moves. The paper says
    it stays (`drifts=False`, MSSP) or moves (`drifts=True`, SP)."""
    lines = [HEAD + "grid | optimal LR per scale | drift, grid steps (per-seed range) | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in sweeps:
        f = s.table[param]
        lines.append(_row(s, _spacing(f), _lrs(f), _drift(f, s.cells[param]),
                          transfer_verdict(f, drifts)))
    return "\n".join(lines)


def transfer_verdict(f: dict[str, Any], drifts: bool) -> str:
    """Whether a family's optimum moved (more than TRANSFER_STEPS) as the paper says it does
    (`drifts`) or does not; inconclusive when it did not move but sat on a grid end."""
    moved = f["drift_steps"] > TRANSFER_STEPS
    if moved or not any(f["opt_at_grid_edge"]):
        return "agree" if moved == drifts else "disagree"
    if all(f["opt_at_grid_edge"]):  # the drift seen is only a lower bound
        return "inconclusive: optimum on the grid edge at every scale"
    return (f"inconclusive: drift >= {f['drift_steps']}, optimum on the grid edge at "
            + ", ".join(f"x{x}" for x, e in zip(f["scales"], f["opt_at_grid_edge"]) if e))


def monotone_table(sweeps: list[Sweep]) -> str:
    """Claim (b): MSSP's best loss per scale, whether it falls at every step, and how many
    steps rise by more than the seed noise."""
    lines = [HEAD + "best loss per scale (mean±std over seeds) | seeds | monotone "
             "| rises beyond noise | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in sweeps:
        f = s.table["mssp"]
        verdict = monotone_verdict(f)
        seeds = "-".join(str(n) for n in sorted({min(f["seeds"]), max(f["seeds"])}))
        lines.append(_row(s, _losses(f), seeds, str(f["monotone_best"]), str(reversals(f)),
                          verdict))
    return "\n".join(lines)


def monotone_verdict(f: dict[str, Any]) -> str:
    return "agree" if f["monotone_best"] else (
        "agree within noise" if reversals(f) == 0 else "disagree")


def gap(f: dict[str, Any], g: dict[str, Any], i: int) -> str:
    """muP's best loss minus MSSP's at scale index `i`, relative to MSSP's, with the two seed
    stds combined in the same unit: whether muP falls behind as the model grows."""
    diff = (f["best_loss"][i] - g["best_loss"][i]) / g["best_loss"][i]
    noise = np.hypot(f["best_loss_std"][i], g["best_loss_std"][i]) / g["best_loss"][i]
    return f"{100 * diff:+.1f}±{100 * noise:.1f}%"


def mup_failures(s: Sweep) -> tuple[list[str], float, float]:
    """(which of drift / monotone / delay muP fails, its half-time ratio, MSSP's)."""
    f, g = s.table["mup"], s.table["mssp"]
    d_mup, d_mssp = delay(s.cells["mup"], f), delay(s.cells["mssp"], g)
    fails = [name for name, bad in (("drift", f["drift_steps"] > TRANSFER_STEPS),
                                    ("monotone", not f["monotone_best"] and reversals(f) > 0),
                                    ("delay", d_mup > 1.25 * d_mssp)) if bad]
    return fails, d_mup, d_mssp


def verdict_table(sweeps: list[Sweep]) -> str:
    """All four verdicts of each sweep in one row, with the figure each rests on."""
    lines = [HEAD + "(a) MSSP drift | (b) MSSP monotone | (c) muP fails | (d) SP drift |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in sweeps:
        m, p = s.table["mssp"], s.table["sp"]
        fails = mup_failures(s)[0]
        short = lambda v: v.split(":")[0]  # noqa: E731
        lines.append(_row(
            s, f"{short(transfer_verdict(m, False))} ({m['drift_steps']})",
            f"{monotone_verdict(m)} ({reversals(m)} rises)",
            f"{'agree' if fails else 'disagree'} ({', '.join(fails) or 'none'})",
            f"{short(transfer_verdict(p, True))} ({p['drift_steps']})"))
    return "\n".join(lines)


def mup_table(sweeps: list[Sweep]) -> str:
    """Claim (c): muP fails at least one of transfer, monotone gains, undelayed learning
    (half-time ratio largest/base scale above MSSP's by 25%). The loss gap to MSSP at the base
    and the largest scale is shown beside the verdict, not part of it."""
    lines = [HEAD + "muP drift (seeds) | muP monotone | delay muP / MSSP | muP fails | verdict "
             "| muP vs MSSP loss, base -> largest |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in sweeps:
        f, g = s.table["mup"], s.table["mssp"]
        fails, d_mup, d_mssp = mup_failures(s)
        lines.append(_row(s, _drift(f, s.cells["mup"]), str(f["monotone_best"]),
                          f"{d_mup:.2f} / {d_mssp:.2f}", ", ".join(fails) or "none",
                          "agree" if fails else "disagree", f"{gap(f, g, 0)} -> {gap(f, g, -1)}"))
    return "\n".join(lines)


def drift_figure(sweeps: list[Sweep], path: str) -> str:
    """Optimal-LR grid index vs scale, one panel per sweep, a line per parameterization, the
    seed range as a band."""
    import matplotlib.pyplot as plt

    cols = 4
    rows = -(-len(sweeps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False,
                             layout="constrained")
    for ax, s in zip(axes.flat, sweeps):
        for k, p in enumerate(PARAMS):
            f = s.table[p]
            shift = 0.1 * (k - 1)  # equal optima stay visible side by side
            idx = np.array([np.nan if i is None else i for i in f["opt_index"]], float) + shift
            per_seed = np.array([[np.nanargmin(t[:, j]) for j in range(min(f["seeds"]))]
                                 for t in summary.family_tables(s.cells[p])[1]], float)
            line, = ax.plot(f["scales"], idx, marker="o", label=p)
            ax.fill_between(f["scales"], per_seed.min(1) + shift, per_seed.max(1) + shift,
                            color=line.get_color(), alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(f["scales"], [f"x{x}" for x in f["scales"]])
        ax.minorticks_off()
        ax.set_title(s.name, fontsize=8)
        ax.set_ylabel("optimal LR (grid index)", fontsize=7)
    for ax in list(axes.flat)[len(sweeps):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return plots._save(fig, path)


def sweep_tables(sweeps: list[Sweep]) -> str:
    """Every sweep's full table (all parameterizations) and links to its figures."""
    out = []
    for s in sweeps:
        figs = sorted(glob.glob(os.path.join(s.folder, "figures", "*.png")))
        out += [f"**{s.name}** ({s.hours}; `{s.folder}`)", "",
                summary.format_table({s.optimizer: s.table}).split("\n\n")[0], "",
                " ".join(f"[{os.path.basename(f)[:-4]}]({os.path.relpath(f, DOCS)})" for f in figs),
                ""]
    return "\n".join(out)


def report(results: str, figures: str | None) -> str:
    """The four claim tables (Markdown) over every finished sweep under `results`."""
    every = load(results)
    sweeps = [s for s in every if s.complete]
    running = [s.name for s in every if not s.complete]
    out = [f"Sweeps: {len(sweeps)} under {results}"
           + (f" (still running, not judged: {', '.join(running)})" if running else "") + "."
           f" Transfer = the seed-mean optimum moves at most {TRANSFER_STEPS} grid step;"
           " * = optimum on the grid edge.", "",
           "**Verdicts** (agree / disagree with the paper; in brackets the figure behind each:"
           " drift in grid steps, loss rises beyond noise, what muP fails)", "",
           verdict_table(sweeps), "",
           "**(a) MSSP's optimal LR is stable**", "", transfer_table(sweeps, "mssp", False), "",
           "**(b) MSSP's loss improves monotonically with scale**", "", monotone_table(sweeps), "",
           "**(c) muP does not reliably transfer and improve**", "", mup_table(sweeps), "",
           "**(d) SP's optimal LR drifts**", "", transfer_table(sweeps, "sp", True), "",
           "Wall time per sweep (2 shared cores, nice 19): " + "; ".join(
               f"{s.name} {s.hours}" for s in sweeps), "", "**Per sweep**", "",
           sweep_tables(sweeps), summary.TABLE_NOTES]
    if figures and sweeps:
        os.makedirs(figures, exist_ok=True)
        path = drift_figure(sweeps, os.path.join(figures, "optimal_lr.png"))
        out += ["", f"![optimal LR (grid index) per width, band: seed range]"
                    f"({os.path.relpath(path, DOCS)})"]
    return "\n".join(out)


def update(document: str, text: str, block: str = "claims") -> None:
    """Replaces what lies between `document`'s marks `<!-- block: begin -->` and
    `<!-- block: end -->` by `text` (one document holds several generated blocks)."""
    begin, end = f"<!-- {block}: begin -->", f"<!-- {block}: end -->"
    with open(document) as f:
        old = f.read()
    if begin not in old or end not in old:
        raise ValueError(f"{document} has no {begin} ... {end} block to replace")
    head, rest = old.split(begin, 1)
    with open(document, "w") as f:
        f.write(f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")


_RESULTS = flags.DEFINE_string("results", "experiments/results/x16", "folder of sweep folders")
_FIGURES = flags.DEFINE_string("figures", None, "where to write the drift figure (optional)")
_UPDATE = flags.DEFINE_string("update", None, "a Markdown file whose claims block to rewrite")
_BLOCK = flags.DEFINE_string("block", "claims", "the name in the block's begin / end marks")


def main(argv: list[str]) -> None:
    del argv
    text = report(_RESULTS.value, _FIGURES.value)
    if _UPDATE.value:
        update(_UPDATE.value, text, _BLOCK.value)
    print(text)


if __name__ == "__main__":
    app.run(main)
