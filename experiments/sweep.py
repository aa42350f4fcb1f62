"""LR-transfer sweep: LR grid x scale x parameterization x optimizer for one regime, resumable.

The unit of work is a *cell*: one (parameterization, optimizer, scale) trained over the whole LR
grid and all seeds as one vmapped program (`mssp_jax.vmap_train`). Each finished cell is written
atomically to ``<workdir>/cells/<key>.json``; a re-run skips cells whose file exists, so a killed
sweep continues where it stopped. Diverged runs are recorded (``diverged: true``), never fatal.
SIGTERM or SIGINT (Ctrl-C) stops the sweep once the cell in progress is written (a signal cannot
interrupt its XLA program); a second one acts as it would without us (SIGTERM kills at once, and
the interrupted cell runs again on the next run).

Where a family's optimum sits on the first or last LR of its grid, ``sweep.extend_edges`` rounds
widen that end (`edge_work`) into extension folders ``<workdir>/edge-<round>/``.

Before the LR cells, a multiplier sweep at the base shape (``kind = mult``) tries per-role
init / LR multipliers one knob at a time; its best point is written into the ``tuned`` fields of
every LR cell's table (the same constants at every scale, as a base-tuned hyperparameter must be).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import signal
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from configs import common
from experiments import plots, summary, tasks
from mssp_jax import factory, vmap_train
from mssp_jax.scaling import ConfigError

Multipliers = dict[str, dict[str, float]]  # {'init' | 'lr': {role: factor}}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One vmapped program: every LR (x multiplier point) and seed of one configuration."""

    kind: str  # 'lr' | 'mult' (| 'coord' for the coordinate check's configs)
    regime: str
    optimizer: str
    parameterization: str
    scale: int

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.regime}-{self.optimizer}-{self.parameterization}-x{self.scale}"


def prepare(config: Any) -> Any:
    """Applies `quick_overrides` when `quick` is set (the reduced variant used by the tests)."""
    config = config.copy_and_resolve_references()
    if config.get("quick", False):
        config.update(config.quick_overrides)
    return config


def plan(config: Any) -> list[Cell]:
    """Every cell, multiplier cells first (LR cells depend on them), then scale-major per family."""
    s, regime = config.sweep, config.regime
    cells = [Cell("mult", regime, opt, s.multipliers.parameterization, 1)
             for opt in s.optimizers if s.multipliers.enabled]
    for param in s.parameterizations:
        for opt in s.optimizers:
            if split_name(param)[0] == "jiang" and opt == "sgd":
                continue  # the Jiang et al. rules are Adam-only
            cells += [Cell("lr", regime, opt, param, scale) for scale in s.scales]
    return cells


GROW = ("width", "depth", "both")  # what a cell's scale multiplies (sweep.grow)


def split_name(name: str) -> tuple[str, str]:
    """A swept parameterization name: a preset, optionally with a depth rule after '+'
    ('mssp+completep' -> ('mssp', 'completep'); 'mup' -> ('mup', ''))."""
    preset, _, depth = name.partition("+")
    return preset, depth


def cell_config(config: Any, cell: Cell) -> Any:
    """The model/training config of one cell: the base shape grown by the cell's scale in width
    (inside the regime), in depth, or in both (`sweep.grow`), and its parameterization."""
    c = config.copy_and_resolve_references()
    b = c.base_shape
    base = (b.width, b.expert_width, b.num_experts, b.top_k)
    grow = c.get("sweep", {}).get("grow", "width")
    width_scale = cell.scale if grow in ("width", "both") else 1
    depth = b.depth * cell.scale if grow in ("depth", "both") else b.depth
    c.shape = common.regime_shape(base, cell.regime, width_scale, depth)
    c.parameterization, depth_scaling = split_name(cell.parameterization)
    if depth_scaling:
        c.depth_scaling = depth_scaling
    c.optimizer.name = cell.optimizer
    return c


def multiplier_points(config: Any) -> list[tuple[dict[str, float], Multipliers]]:
    """The one-knob-at-a-time grid: (knob settings, role multipliers), the all-ones point first."""
    m = config.sweep.multipliers
    points = [({}, {})]
    for name in m.use:
        kind, *roles = m.knobs[name]
        for value in m.factors:
            points.append(({name: value}, {kind: {role: value for role in roles}}))
    return points


def cell_path(workdir: str, cell: Cell) -> str:
    return os.path.join(workdir, "cells", f"{cell.key}.json")


def write_atomic(path: str, payload: Any) -> None:
    """Write-then-rename: a killed writer leaves a *.tmp file, never a truncated result."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f)
    os.replace(path + ".tmp", path)


def load_cell(workdir: str, cell: Cell) -> dict[str, Any] | None:
    path = cell_path(workdir, cell)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def extensions(workdir: str) -> list[str]:
    """Extension workdirs inside `workdir` (any `workdir/<name>/cells/`): sweeps of some of the
    same cells with more LRs or seeds, e.g. a grid widened where an optimum sat on its edge.
    Their runs join the cells of `workdir` wherever those are read (`run_sources`)."""
    return sorted(os.path.dirname(d) for d in glob.glob(os.path.join(workdir, "*", "cells")))


def run_sources(workdir: str, others: Sequence[str] = (), before_round: int | None = None
                ) -> list[str]:
    """The workdirs whose runs join `workdir`'s cells: `others`, then its extensions, each once;
    with `before_round`, only the edge rounds before it (what that round was planned from)."""
    def wanted(d: str) -> bool:
        r = edge_round(d)
        return before_round is None or r is None or r < before_round
    return list(dict.fromkeys(os.path.normpath(d) for d in [*others, *extensions(workdir)]
                              if wanted(d)))


EDGE_FOLDER = "edge-"  # + the round: where `edge_work` writes the LRs it adds


def edge_round(folder: str) -> int | None:
    """The round of an edge-widening folder (`<workdir>/edge-2` -> 2); None for other folders."""
    name = os.path.basename(os.path.normpath(folder))
    tail = name[len(EDGE_FOLDER):]
    return int(tail) if name.startswith(EDGE_FOLDER) and tail.isdigit() else None


def grid_ratio(lrs: Sequence[float]) -> float:
    """The constant ratio of a geometric LR grid (raises ConfigError for any other grid)."""
    ratios = np.asarray(lrs[1:]) / np.asarray(lrs[:-1])
    if len(lrs) < 2 or not np.allclose(ratios, ratios[0], rtol=1e-6) or ratios[0] <= 1:
        raise ConfigError("sweep.extend_edges needs increasing geometric LR grids, "
                          f"got {list(lrs)}")
    return float(ratios[0])


def widened(records: list[dict[str, Any]], ratio: float, count: int) -> list[float]:
    """The LRs one round adds to a family (its records over scales): `count` grid steps beyond
    each end of its grid (all its scales' LRs) where some scale's seed-mean optimum sits on that
    end; [] if none does."""
    family = summary.family_summary(records)
    lrs, opt = family["lrs"], set(family["opt_index"])
    return ([lrs[0] / ratio ** k for k in range(count, 0, -1)] * (0 in opt) +
            [lrs[-1] * ratio ** k for k in range(1, count + 1)] * (len(lrs) - 1 in opt))


def edge_work(config: Any, workdir: str, round_: int) -> list[tuple[str, Cell, list[float]]]:
    """Round `round_` of grid widening: for each LR family whose cells (with the earlier rounds'
    runs) are all finished, the LRs `widened` adds, at every scale of the family (one grid at every
    scale keeps the drift in grid steps comparable), as (cell file, cell, LRs)."""
    s, folder = config.sweep, os.path.join(workdir, f"{EDGE_FOLDER}{round_}")
    sources = run_sources(workdir, s.get("merge_workdirs", ()), before_round=round_)
    families: dict[tuple[str, str], list[Cell]] = {}
    for cell in plan(config):
        if cell.kind == "lr":
            families.setdefault((cell.parameterization, cell.optimizer), []).append(cell)
    work = []
    for (_, opt), cells in families.items():
        records = [load_cell(workdir, c) for c in cells]
        if any(r is None for r in records):
            continue
        lrs = widened([with_runs(r, sources) for r in records],
                      grid_ratio(s.lr_grids[opt]), s.get("extend_by", 2))
        work += [(cell_path(folder, c), c, lrs) for c in cells] if lrs else []
    return work


def all_work(config: Any, workdir: str) -> Iterator[tuple[str, Cell, list[float] | None]]:
    """Every (cell file, cell, LRs; None: the config's grid) of the sweep in order: the plan, then
    the edge rounds, each planned lazily from the finished cells before it."""
    yield from ((cell_path(workdir, c), c, None) for c in plan(config))
    for round_ in range(1, config.sweep.get("extend_edges", 0) + 1):
        work = edge_work(config, workdir, round_)
        if not work:
            return
        yield from work


def with_runs(record: dict[str, Any], sources: Sequence[str]) -> dict[str, Any]:
    """`record` with the runs of the same cell in each of `sources` appended."""
    cell = Cell(**record["cell"])
    for source in sources:
        extra = load_cell(source, cell)
        record["runs"] += extra["runs"] if extra is not None else []
    return record


def best_multipliers(workdir: str, config: Any, optimizer: str) -> tuple[dict, Multipliers]:
    """The multiplier point with the lowest seed-mean eval loss (at its best LR); ones if none."""
    cell = Cell("mult", config.regime, optimizer, config.sweep.multipliers.parameterization, 1)
    result = load_cell(workdir, cell) if config.sweep.multipliers.enabled else None
    if result is None:
        return {}, {}
    best = min(result["points"], key=lambda p: summary.best_of_grid(p["runs"])[1])
    return best["knobs"], best["multipliers"]


def run_cell(config: Any, cell: Cell, data: dict, workdir: str,
             lrs: Sequence[float] | None = None) -> dict[str, Any]:
    """Trains one cell over `lrs` (default: the config's grid) and returns its JSON record."""
    start = time.monotonic()
    c = cell_config(config, cell)
    s = config.sweep
    lrs = list(s.lr_grids[cell.optimizer] if lrs is None else lrs)
    record = {"cell": dataclasses.asdict(cell), "shape": c.shape.to_dict(), "task": c.task,
              "steps": c.steps, "batch_size": c.batch_size}
    if cell.kind == "mult":
        points = multiplier_points(config)
        result = vmap_train.train_lrs(c, lrs * len(points), s.multipliers.seeds, data,
                                      [mult for _, mult in points for _ in lrs])
        runs = _runs(result, early_steps=0)
        record["points"] = [{"knobs": knobs, "multipliers": mult,
                             "runs": runs[i * len(lrs) * len(result.seeds):
                                          (i + 1) * len(lrs) * len(result.seeds)]}
                            for i, (knobs, mult) in enumerate(points)]
        return record | {"wall_s": time.monotonic() - start}
    knobs, mult = best_multipliers(workdir, config, cell.optimizer)
    c.tuned = as_tuned(mult)
    result = vmap_train.train_lrs(c, lrs, s.seeds, data, max_runs=s.get("max_runs_per_program", 0))
    record.update(multiplier_knobs=knobs, tuned=as_tuned(mult), runs=_runs(result, s.early_steps),
                  wall_s=time.monotonic() - start)  # compile included: what a cell costs here
    return record


def as_tuned(multipliers: Multipliers) -> dict[str, dict[str, float]]:
    """A multiplier point as the table's `tuned` fields: 'init' scales the std, 'lr' the LR."""
    tuned: dict[str, dict[str, float]] = {}
    for kind, field in (("init", "std"), ("lr", "lr")):
        for role, factor in multipliers.get(kind, {}).items():
            tuned.setdefault(role, {})[field] = float(factor)
    return tuned


def _runs(result: vmap_train.SweepResult, early_steps: int) -> list[dict[str, Any]]:
    """Per-run records; the training curve is kept whole for the first `early_steps` steps and
    as 10-step means after (enough for the delayed-learning plot, small on disk)."""
    runs = []
    for i in range(len(result.lrs)):
        for j in range(len(result.seeds)):
            run = result.run(i, j)
            curve = np.asarray([np.nan if x is None else x for x in run.pop("train_loss")])
            blocks = curve[: len(curve) // 10 * 10].reshape(-1, 10).mean(-1)
            as_json = lambda xs: [float(x) if np.isfinite(x) else None for x in xs]  # noqa: E731
            run.update(early=as_json(curve[:early_steps]), curve_10=as_json(blocks))
            runs.append(run)
    return runs


def validate(config: Any) -> None:
    """Every cell's config, before any cell trains (raises ConfigError)."""
    if config.sweep.get("grow", "width") not in GROW:
        raise ConfigError(f"sweep.grow must be one of {list(GROW)}, got {config.sweep.grow!r}")
    for name, default, least in (("extend_edges", 0, 0), ("extend_by", 2, 1)):
        value = config.sweep.get(name, default)
        if not isinstance(value, int) or value < least:
            raise ConfigError(f"sweep.{name} must be an integer >= {least}, got {value!r}")
    if config.sweep.get("extend_edges", 0):
        for opt in config.sweep.optimizers:
            grid_ratio(config.sweep.lr_grids[opt])
    for cell in plan(config):
        factory.validate(cell_config(config, cell))


@contextlib.contextmanager
def stop_requests() -> Iterator[list[signal.Signals]]:
    """Records the first SIGTERM / SIGINT in the yielded list instead of acting on it; after that
    signal its default action is back, so a second one stops the process at once."""
    received: list[signal.Signals] = []

    def handle(signum: int, frame: Any) -> None:
        received.append(signal.Signals(signum))
        signal.signal(signum, previous[signum])
        print(f"[sweep] {received[0].name}: stopping once the cell in progress is written "
              "(send it again to stop at once)", flush=True)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)


def run_sweep(config: Any, workdir: str) -> dict[str, Any]:
    """Runs every unfinished cell (at most `sweep.max_cells` of them, if set) until a stop
    signal; returns the keys of the cells it ran and skipped and the signal (None if none)."""
    config = prepare(config)
    validate(config)
    data = tasks.load(config)
    ran, skipped, budget = [], [], config.sweep.get("max_cells", 0)
    with stop_requests() as stop:
        for path, cell, lrs in all_work(config, workdir):
            name = os.path.relpath(path, workdir).replace(f"cells{os.sep}", "")[:-len(".json")]
            if os.path.exists(path):
                skipped.append(name)
                continue
            if stop or (budget and len(ran) >= budget):
                break
            print(f"[sweep] {name}" + (f" (LRs {', '.join(f'{x:.3g}' for x in lrs)})"
                                       if lrs else ""), flush=True)
            write_atomic(path, run_cell(config, cell, data, workdir, lrs))
            ran.append(name)
    return {"ran": ran, "skipped": skipped, "stopped_by": stop[0] if stop else None}


def finished(config: Any, workdir: str) -> list[dict[str, Any]]:
    """The records of the finished LR cells of `config`'s plan, with the runs of the same cells in
    `sweep.merge_workdirs` (sweeps of the same plan with other seeds, e.g. a third seed run later
    into its own workdir) and in the workdir's extensions appended."""
    sources = run_sources(workdir, config.sweep.get("merge_workdirs", ()))
    records = [load_cell(workdir, c) for c in plan(prepare(config)) if c.kind == "lr"]
    return [with_runs(r, sources) for r in records if r is not None]


def main(config: Any, workdir: str) -> int:
    """`python run.py sweep --config configs/sweeps_*.py`: run, summarise, plot.

    With ``--config.sweep.only_summarize=True`` nothing trains: the finished cells of the plan are
    summarised and plotted (e.g. after sweeps that ran subsets of it into the same workdir).
    """
    cells = os.path.join(workdir, "cells")
    if not config.sweep.get("only_summarize", False):
        status = run_sweep(config, workdir)
        print(f"[sweep] ran {len(status['ran'])} cells, skipped {len(status['skipped'])} finished")
        if status["stopped_by"]:
            print(f"[sweep] stopped by {status['stopped_by'].name}; the finished cells are in "
                  f"{cells}/ and the same command resumes with the next one")
            return 128 + status["stopped_by"]  # the shell's status for a signal
    records = finished(config, workdir)
    table = summary.summarize(records)
    path = os.path.join(workdir, f"summary_{config.regime}.json")
    write_atomic(path, table)
    figures = plots.sweep_figures(table, records, workdir, config.regime)
    print(summary.format_table(table))
    print(f"[sweep] summary: {path}; cells: {cells}/")
    print(f"[sweep] figures: {', '.join(figures) or 'none (no finished LR cell)'}")
    return 0
