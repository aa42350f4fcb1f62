"""Paper-style figures of the sweeps (matplotlib, PNG, ~100 dpi): loss vs LR per scale, loss vs
scale at the base-optimal LR, early training curves muP vs MSSP."""

from __future__ import annotations

import os
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 100
SMOOTH = 5  # steps averaged in the early-training curves (fresh batches of 16 are noisy)
PARAM_STYLE = {"sp": "o-", "mup": "s-", "mssp": "D-", "mup_global_eps": "v--", "jiang": "^:"}
SCALE_LABEL = "scale (N/N0; L/L0 when depth grows)"
DEPTH_LINE = {"none": "-", "depth_mup": "--", "completep": ":"}  # 'preset+depth rule' names


def style(param: str) -> str:
    """Marker and line of a swept parameterization: the preset's marker, the depth rule's line."""
    preset, _, depth = param.partition("+")
    base = PARAM_STYLE.get(preset, "x-")
    return base[0] + DEPTH_LINE.get(depth, "-.") if depth else base


def param_key(param: str) -> tuple[int, int]:
    """Plot order: presets as in PARAM_STYLE, then depth rules as in DEPTH_LINE."""
    preset, _, depth = param.partition("+")
    presets, depths = list(PARAM_STYLE), list(DEPTH_LINE)
    return (presets.index(preset) if preset in presets else 99,
            depths.index(depth) + 1 if depth in depths else 0)


def scale_colours(n: int) -> list:
    return [plt.cm.viridis(x) for x in np.linspace(0.0, 0.85, max(n, 1))]


def _nan(xs: list) -> np.ndarray:
    return np.asarray([np.nan if x is None else x for x in xs], float)


def _log_xlim(ax, xs: list) -> None:
    """Limits with a margin, also for a single point (where matplotlib's own are singular)."""
    ax.set_xlim(min(xs) / 1.5, max(xs) * 1.5)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def loss_vs_lr(table: dict[str, Any], regime: str, path: str) -> str:
    """One panel per (optimizer, parameterization); one line per scale; stars at the optima."""
    opts = list(table)
    params = sorted({p for o in opts for p in table[o]}, key=param_key)
    fig, axes = plt.subplots(len(opts), len(params), figsize=(3.0 * len(params), 2.6 * len(opts)),
                             squeeze=False, sharey="row")
    for r, opt in enumerate(opts):
        row = np.concatenate([_nan(m) for f in table[opt].values() for m in f["mean_loss"]])
        row = row[np.isfinite(row)]
        for c, param in enumerate(params):
            ax = axes[r, c]
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # < 1 decade: overlap
            ax.set_title(f"{param}, {opt}, regime {regime}", fontsize=9)
            fam = table[opt].get(param)
            if fam is None:
                ax.text(0.5, 0.5, "not run", transform=ax.transAxes, ha="center")
                continue
            _log_xlim(ax, fam["lrs"])
            for colour, scale, mean, std, i in zip(scale_colours(len(fam["scales"])), fam["scales"],
                                                   fam["mean_loss"], fam["std_loss"],
                                                   fam["opt_index"]):
                mean, std = _nan(mean), _nan(std)
                ax.errorbar(fam["lrs"], mean, yerr=std, color=colour, marker="o", ms=3,
                            label=f"x{scale}", capsize=2)
                if i is not None:
                    ax.plot(fam["lrs"][i], mean[i], "*", color=colour, ms=11, mec="k")
            ax.set_xlabel("base learning rate")
            if c == 0:
                ax.set_ylabel("final eval loss")
            ax.legend(fontsize=7, title="scale", title_fontsize=7)
        if row.size:  # a few near-divergent points would squash the rest of the row
            low, high = row.min(), np.percentile(row, 90)
            margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.05  # one value: a margin too
            axes[r, 0].set_ylim(low - margin, high + margin)
    fig.tight_layout()
    return _save(fig, path)


def loss_vs_scale(table: dict[str, Any], regime: str, path: str) -> str:
    """Final loss vs scale at each family's base-optimal LR (and at its per-scale optimum)."""
    fig, axes = plt.subplots(1, len(table), figsize=(4.2 * len(table), 3.2), squeeze=False)
    for ax, (opt, fams) in zip(axes[0], table.items()):
        for param, fam in sorted(fams.items(), key=lambda kv: param_key(kv[0])):
            line, = ax.plot(fam["scales"], _nan(fam["loss_at_base_opt_lr"]), style(param),
                            label=f"{param} (base-opt LR)")
            ax.plot(fam["scales"], _nan(fam["best_loss"]), style(param)[0], mfc="none",
                    color=line.get_color(), ls="none", label=f"{param} (per-scale opt)")
        ax.set_xscale("log", base=2)
        _log_xlim(ax, [s for fam in fams.values() for s in fam["scales"]])
        ax.set_xlabel(SCALE_LABEL)
        ax.set_ylabel("final eval loss")
        ax.set_title(f"{opt}, regime {regime}")
        ax.legend(fontsize=6)
    return _save(fig, path)


def early_curves(records: list[dict[str, Any]], table: dict[str, Any], regime: str,
                 path: str, params: tuple[str, ...] = ("mup", "mssp")) -> str:
    """Seed-mean training loss of the first steps at each family's base-optimal LR, per scale."""
    opts = [o for o in table if any(p in table[o] for p in params)]
    fig, axes = plt.subplots(1, max(len(opts), 1), figsize=(4.5 * max(len(opts), 1), 3.2),
                             squeeze=False)
    for ax, opt in zip(axes[0], opts):
        for param, style in zip(params, ("--", "-")):
            fam = table[opt].get(param)
            if fam is None or fam["opt_lr"][0] is None:
                continue
            lr = fam["opt_lr"][0]
            recs = sorted((r for r in records if r["cell"]["optimizer"] == opt
                           and r["cell"]["parameterization"] == param),
                          key=lambda r: r["cell"]["scale"])
            for colour, rec in zip(scale_colours(len(recs)), recs):
                curve = np.mean([_nan(r["early"]) for r in rec["runs"] if r["lr"] == lr], 0)
                window = min(SMOOTH, len(curve))
                smooth = np.convolve(curve, np.ones(window) / window, mode="valid")
                ax.plot(np.arange(window, len(curve) + 1), smooth, style, color=colour,
                        label=f"{param} x{rec['cell']['scale']}")
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss ({SMOOTH}-step mean)")
        ax.set_title(f"early training, {opt}, regime {regime}")
        if ax.get_legend_handles_labels()[0]:  # nothing to plot when every LR diverged at x1
            ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def sweep_figures(table: dict[str, Any], records: list[dict[str, Any]], workdir: str,
                  regime: str) -> list[str]:
    """All sweep figures of one regime into <workdir>/figures/."""
    out = os.path.join(workdir, "figures")
    if not table:
        return []
    return [loss_vs_lr(table, regime, os.path.join(out, f"loss_vs_lr_{regime}.png")),
            loss_vs_scale(table, regime, os.path.join(out, f"loss_vs_scale_{regime}.png")),
            early_curves(records, table, regime, os.path.join(out, f"early_{regime}.png"))]


def _param_order(results: dict[str, Any]) -> list[str]:
    return sorted(results, key=param_key)


def _seed_spread(entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    per_seed = np.asarray(entry["per_seed"], float)  # [scales, seeds]
    return per_seed.mean(1), per_seed.std(1)


def coord_exponents(results: dict[str, Any], names: list[str], title: str, path: str) -> str:
    """Exponent bars (mean ± seed std of the per-seed fits) at the last recorded step."""
    params = _param_order(results)
    last = max(results[params[0]]["steps"], key=int)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.32 * len(names)), 4.0))
    width = 0.8 / len(params)
    for i, param in enumerate(params):
        cells = [results[param]["steps"][last][n] for n in names]
        ax.bar(np.arange(len(names)) + i * width, np.nan_to_num([c["exponent"] for c in cells]),
               width, yerr=np.nan_to_num([c["exponent_std"] for c in cells]), capsize=2,
               label=param)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=75, fontsize=7)
    ax.set_ylabel("exponent (log-log slope vs scale)")
    ax.set_title(f"{title}: exponents at step {last} (mean ± seed std)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def rcc(results: dict[str, Any], names: list[str], title: str, path: str) -> str:
    """The paper's RCC plots: each observable against the scale, one line per recorded step
    (seed mean, bars: seed std), one panel per observable, one row per parameterization."""
    params = _param_order(results)
    steps = sorted(results[params[0]]["steps"], key=int)
    fig, axes = plt.subplots(len(params), len(names), squeeze=False,
                             figsize=(2.6 * len(names), 2.3 * len(params)))
    for row, param in zip(axes, params):
        r = results[param]
        for ax, name in zip(row, names):
            positive = False
            for colour, step in zip(scale_colours(len(steps)), steps):
                mean, std = _seed_spread(r["steps"][step][name])
                positive |= bool(np.any(mean > 0))
                ax.errorbar(r["scales"], mean, yerr=std, color=colour, marker="o", ms=3, capsize=2,
                            label=f"step {step}")
            ax.set_xscale("log", base=2)
            if positive:  # steps where it is exactly 0 (nothing has moved yet) are left out
                ax.set_yscale("log", nonpositive="mask")
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{param}: {name}", fontsize=8)
            ax.tick_params(labelsize=7)
        row[0].set_ylabel("rms")
    fig.supxlabel(SCALE_LABEL)  # once: per-panel labels overlap in narrow panels
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def exponents_vs_step(results: dict[str, Any], names: list[str], title: str, path: str) -> str:
    """Each observable's exponent (mean ± seed std) against the training step, one panel per
    parameterization."""
    params = _param_order(results)
    steps = sorted(results[params[0]]["steps"], key=int)
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.6), squeeze=False,
                             sharey=True)
    for ax, param in zip(axes[0], params):
        for i, name in enumerate(names):
            cells = [results[param]["steps"][s][name] for s in steps]
            ax.errorbar(np.arange(len(steps)) + 0.03 * i, [c["exponent"] for c in cells],
                        yerr=[c["exponent_std"] for c in cells], marker="o", ms=3, capsize=2,
                        label=name, color=plt.cm.tab20(i % 20))
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(np.arange(len(steps)), steps)
        ax.set_xlabel("step")
        ax.set_title(param)
    axes[0, 0].set_ylabel("exponent")
    axes[0, -1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def coord_figures(results: dict[str, Any], tag: str, groups: dict[str, list[str]],
                  out: str) -> list[str]:
    """Exponent bars of `groups['table']`, one RCC figure per other group (panels: its
    observables) and the exponents of `groups['vs_step']` against the step."""
    title = f"coordinate check {tag}"
    paths = [coord_exponents(results, groups["table"], title,
                             os.path.join(out, f"coord_exponents_{tag}.png")),
             exponents_vs_step(results, groups["vs_step"], title,
                               os.path.join(out, f"coord_exponents_vs_step_{tag}.png"))]
    for group, names in groups.items():
        if group not in ("table", "vs_step") and names:
            paths.append(rcc(results, names, f"{title}: {group}",
                             os.path.join(out, f"coord_rcc_{tag}_{group}.png")))
    return paths
