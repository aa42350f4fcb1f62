"""From finished sweep cells to the numbers RESULTS.md reports: optimum per scale, LR drift in
grid steps, monotonicity in scale, losses with their spread over seeds."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np


def loss_table(runs: list[dict[str, Any]], lrs: list[float] | None = None
               ) -> tuple[list[float], np.ndarray]:
    """(sorted LRs, eval loss [lr, seed]) with NaN for diverged runs and for LRs of `lrs` (default:
    the LRs of `runs`) that were not run."""
    lrs = sorted({r["lr"] for r in runs}) if lrs is None else lrs
    seeds = sorted({r["seed"] for r in runs})
    table = np.full((len(lrs), len(seeds)), np.nan)
    for r in runs:
        if not r["diverged"] and r["eval_loss"] is not None:
            table[lrs.index(r["lr"]), seeds.index(r["seed"])] = r["eval_loss"]
    return lrs, table


def seed_mean(table: np.ndarray) -> np.ndarray:
    """Mean over seeds; an LR where any seed diverged counts as diverged (NaN)."""
    return np.where(np.isnan(table).any(-1), np.nan, np.nanmean(np.nan_to_num(table), -1))


def seed_std(table: np.ndarray) -> np.ndarray:
    """Std over the finished seeds of each LR; NaN where none finished (no warning)."""
    std = np.full(len(table), np.nan)
    some = ~np.isnan(table).all(-1)
    std[some] = np.nanstd(table[some], -1)
    return std


def best_of_grid(runs: list[dict[str, Any]]) -> tuple[float, float]:
    """(best LR, its seed-mean loss); (nan, inf) when every LR diverged."""
    lrs, table = loss_table(runs)
    mean = seed_mean(table)
    if np.isnan(mean).all():
        return float("nan"), float("inf")
    i = int(np.nanargmin(mean))
    return lrs[i], float(mean[i])


def family_tables(records: list[dict[str, Any]]) -> tuple[list[float], list[np.ndarray]]:
    """(every LR run at any scale, sorted; each record's loss table on that common grid): grid
    steps mean the same at every scale even where a grid was widened at some scales only."""
    lrs = sorted({run["lr"] for r in records for run in r["runs"]})
    return lrs, [loss_table(r["runs"], lrs)[1] for r in records]


def at_grid_edge(lrs: list[float], runs: list[dict[str, Any]], index: int | None) -> bool:
    """Whether the optimum `lrs[index]` is the smallest or largest LR run in `runs`."""
    ran = {r["lr"] for r in runs}
    return index is not None and lrs[index] in (min(ran), max(ran))


def family_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary of one (parameterization, optimizer) over its scales (records sorted by scale)."""
    scales = [r["cell"]["scale"] for r in records]
    lrs, tables = family_tables(records)
    means = [seed_mean(t) for t in tables]
    opt_idx = [int(np.nanargmin(m)) if not np.isnan(m).all() else None for m in means]
    valid = [i for i in opt_idx if i is not None]
    base_i = opt_idx[0]
    at_base = [float(m[base_i]) if base_i is not None else float("nan") for m in means]
    best = [float(m[i]) if i is not None else float("nan") for m, i in zip(means, opt_idx)]
    best_std = [float(np.std(t[i])) if i is not None else float("nan")
                for t, i in zip(tables, opt_idx)]
    decreasing = lambda xs: bool(np.all(np.diff(xs) < 0))  # noqa: E731
    return {
        "scales": scales, "lrs": lrs,
        "mean_loss": [[None if np.isnan(x) else float(x) for x in m] for m in means],
        "std_loss": [[None if np.isnan(x) else float(x) for x in seed_std(t)] for t in tables],
        "seeds": [t.shape[1] for t in tables],
        "diverged": [[sum(run["lr"] == lr and (run["diverged"] or run["eval_loss"] is None)
                          for run in r["runs"]) for lr in lrs] for r in records],
        "opt_lr": [lrs[i] if i is not None else None for i in opt_idx],
        "opt_index": opt_idx,
        "opt_at_grid_edge": [at_grid_edge(lrs, r["runs"], i) for r, i in zip(records, opt_idx)],
        "drift_steps": (max(valid) - min(valid)) if valid else None,
        "best_loss": best, "best_loss_std": best_std,
        "loss_at_base_opt_lr": at_base,
        "monotone_best": decreasing(best), "monotone_at_base_lr": decreasing(at_base),
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """{optimizer: {parameterization: family summary}} over the finished LR cells."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["cell"]["optimizer"], r["cell"]["parameterization"])].append(r)
    out: dict[str, Any] = defaultdict(dict)
    for (opt, param), recs in sorted(groups.items()):
        out[opt][param] = family_summary(sorted(recs, key=lambda r: r["cell"]["scale"]))
        out[opt][param]["multiplier_knobs"] = recs[0].get("multiplier_knobs", {})
    return dict(out)


TABLE_NOTES = ("*: the optimum is at the edge of the LR grid, so the true optimum may lie outside "
               "it; div: every LR diverged. Drift: how many grid steps the optimal LR moves across "
               "scales. Monotone: the loss falls at every larger scale, at each scale's best LR / "
               "at the base scale's best LR.")


def format_table(table: dict[str, Any]) -> str:
    """A Markdown table, one row per (optimizer, parameterization), then what its marks mean."""
    lines = ["| optimizer | param | scales | n seeds | optimal LR per scale | drift (grid steps) | "
             "best loss per scale (mean ± std over seeds) | monotone (best / at base LR) |",
             "|---|---|---|---|---|---|---|---|"]
    for opt, fams in table.items():
        for param, f in fams.items():
            lrs = ", ".join("div" if x is None else f"{x:.3g}" +
                            ("*" if edge else "") for x, edge in
                            zip(f["opt_lr"], f["opt_at_grid_edge"]))
            losses = ", ".join(f"{m:.4f}" + (f" ± {s:.4f}" if n > 1 else "") for m, s, n in
                               zip(f["best_loss"], f["best_loss_std"], f["seeds"]))
            seeds = sorted(set(f["seeds"]))
            lines.append(f"| {opt} | {param} | {f['scales']} | {', '.join(map(str, seeds))} | "
                         f"{lrs} | {f['drift_steps']} | {losses} | "
                         f"{f['monotone_best']} / {f['monotone_at_base_lr']} |")
    return "\n".join([*lines, "", TABLE_NOTES])
