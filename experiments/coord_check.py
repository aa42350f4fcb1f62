"""Coordinate checks of our models from a config: every parameterization x scale x seed, the
exponent table and the RCC figures
(`python run.py coord_check --config configs/sweeps_coord_check*.py`).

The observables come from the model's own layers (`mssp_jax.coord`); this driver builds the model,
optimizer and data of each cell from the config, trains it over the seeds, fits the exponents per
seed and reports them. Each finished (parameterization, scale) cell is written atomically to
``<workdir>/cells/`` and skipped when the command is run again, so a killed check resumes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import plots, sweep, tasks
from mssp_jax import coord, factory, losses, presets, vmap_train
from mssp_jax.scaling import ConfigError

AGGREGATION = ("h_agg/base", "h_agg/propagating", "h_agg/effective", "h_agg/cross", "h_agg/total")
ROUTER = ("router/logit_rms", "router/gate_entropy", "router/max_gate", "router/load_min")
# The Transformer's residual stream: at the top, and every block's output (quadratic mean).
RESIDUAL = ("residual/top", "residual/top_change", "Block/output", "Block/output_change")
KINDS = ("activation", "effective_update", "propagating_update")
DATA_ROLES = ("input", "embedding")  # their input is the data: no propagating update


def tag(config: Any) -> str:
    """The name of a check's outputs: the regime, prefixed for the Transformer."""
    return config.regime if config.model == "mlp_moe" else f"transformer_{config.regime}"


def model_factory(config: Any, parameterization: str) -> Callable[[float, int], Any]:
    """(scale, seed) -> (model, optimizer) of one cell: the chain built at unit LR, then the
    config's LR (as the sweeps train; `mssp_jax.vmap_train`)."""

    def make(scale: float, seed: int) -> coord.ModelAndOptimizer:
        cell = sweep.Cell("coord", config.regime, config.optimizer.name, parameterization,
                          int(scale))
        unit = vmap_train.unit_lr_config(sweep.cell_config(config, cell))
        scaling = factory.validate(unit)
        model = factory.build_model(unit, nnx.Rngs(seed), scaling)
        tx = factory.build_optimizer(unit, scaling, model)
        return model, optax.chain(tx, optax.scale(config.optimizer.learning_rate))

    return make


def validate(config: Any) -> None:
    """The `coord` block and every cell's config, before any compute (ConfigError names the
    field)."""
    c = config.coord
    for field, minimum in (("scales", 1), ("seeds", 0), ("record_steps", 0)):
        values = list(c[field])
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum
                                 for v in values):
            raise ConfigError(f"coord.{field} must be a non-empty list of integers >= {minimum}, "
                              f"got {values!r}")
    if len(c.scales) < 2:
        raise ConfigError("coord.scales needs at least 2 scales to fit exponents, "
                          f"got {list(c.scales)}")
    for param in c.parameterizations:
        for scale in c.scales:
            factory.validate(sweep.cell_config(config, sweep.Cell(
                "coord", config.regime, config.optimizer.name, param, scale)))


def measure(config: Any, data: dict, parameterization: str,
            scale: int) -> dict[int, dict[str, np.ndarray]]:
    """Every observable per seed at each recorded step of one (parameterization, scale) cell."""
    steps, bsz = max(config.coord.record_steps), config.batch_size
    batches = jax.tree.map(lambda a: jnp.asarray(a[:steps * bsz]).reshape(
        steps, bsz, *a.shape[1:]), data["train"])
    make = model_factory(config, parameterization)
    return coord.measure(lambda seed: make(scale, seed),
                         lambda model, batch: losses.loss_fn(model, batch, config)[0], batches,
                         jax.tree.map(jnp.asarray, data["eval"]), config.coord.record_steps,
                         config.coord.seeds)


def measure_cell(config: Any, data: dict, parameterization: str, scale: int,
                 workdir: str) -> dict[int, dict[str, np.ndarray]]:
    """`measure`, written to ``<workdir>/cells/`` once finished and read from there after."""
    cell = sweep.Cell("coord", tag(config), config.optimizer.name, parameterization, scale)
    if sweep.load_cell(workdir, cell) is None:
        values = measure(config, data, parameterization, scale)
        sweep.write_atomic(sweep.cell_path(workdir, cell),
                           {str(step): {k: v.tolist() for k, v in obs.items()}
                            for step, obs in values.items()})
        print(f"[coord_check] {cell.key}", flush=True)
    record = sweep.load_cell(workdir, cell)
    return {int(step): {k: np.asarray(v) for k, v in obs.items()} for step, obs in record.items()}


def run(config: Any, workdir: str) -> dict[str, Any]:
    """{parameterization: `coord.summarize` of its cells} for the prepared `config`."""
    config.steps = max(config.coord.record_steps) + 1
    data = tasks.load(config)
    scales = list(config.coord.scales)
    return {param: coord.summarize(scales, config.coord.seeds,
                                   [measure_cell(config, data, param, s, workdir) for s in scales])
            for param in config.coord.parameterizations}


def _names(results: dict[str, Any]) -> set[str]:
    """Every observable measured (those of the first parameterization's first step)."""
    return set(next(iter(next(iter(results.values()))["steps"].values())))


def _roles(results: dict[str, Any]) -> list[str]:
    """The roles whose kernel terms were measured (their layers record inputs), in table order."""
    names = _names(results)
    return [r for r in presets.ROLES if f"{r}/activation" in names]


def table_rows(results: dict[str, Any]) -> tuple[str, ...]:
    """The rows RESULTS.md reports: the aggregation split, each role's updates, the router."""
    roles = _roles(results)
    kinds = {r: KINDS[:2] if r in DATA_ROLES else KINDS for r in roles}
    residual = tuple(r for r in RESIDUAL if r in _names(results))
    return (*AGGREGATION, *(f"{r}/{k}" for r in roles for k in kinds[r]), *ROUTER, *residual)


def figure_groups(results: dict[str, Any]) -> dict[str, list[str]]:
    """What `plots.coord_figures` draws: the table's exponents; exponents against the step; one
    RCC figure per kind (a panel per role), for the aggregation split and for the router."""
    rows, roles = table_rows(results), _roles(results)
    groups = {"table": list(rows),
              "vs_step": [*AGGREGATION[:4], *(f"{r}/effective_update" for r in roles)],
              "aggregation": list(AGGREGATION), "router": list(ROUTER)}
    if "residual/top" in rows:
        groups["residual"] = [r for r in RESIDUAL if r in rows]
    for kind in (*KINDS, "grad"):
        groups[kind] = [f"{r}/{kind}" for r in roles if f"{r}/{kind}" in rows or kind == "grad"]
    return groups


def format_table(results: dict[str, Any], steps: tuple[str, ...],
                 rows: tuple[str, ...]) -> str:
    """A Markdown table of exponents (mean ± seed std of the per-seed fits): one row per
    observable, one column per (parameterization, step)."""
    cols = [(p, s) for p in results for s in steps]
    lines = ["| observable | " + " | ".join(f"{p} @{s}" for p, s in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name in rows:
        cells = [results[p]["steps"][s][name] for p, s in cols]
        lines.append(f"| {name} | " + " | ".join(
            "n/a" if np.isnan(c["exponent"]) else f"{c['exponent']:+.2f} ± {c['exponent_std']:.2f}"
            for c in cells) + " |")
    return "\n".join(lines)


def main(config: Any, workdir: str) -> int:
    """`python run.py coord_check --config configs/sweeps_coord_check.py:regime=II` (MLP-MoE) or
    `--config configs/sweeps_coord_check_transformer.py:regime=III` (Transformer-MoE)."""
    config = sweep.prepare(config)
    validate(config)
    results = run(config, workdir)
    name = tag(config)
    path = os.path.join(workdir, f"coord_check_{name}.json")
    sweep.write_atomic(path, {"regime": config.regime, "model": config.model,
                              "optimizer": config.optimizer.name,
                              "learning_rate": config.optimizer.learning_rate,
                              "constants": config.get("constants", "ratio"), "results": results})
    figures = plots.coord_figures(results, name, figure_groups(results),
                                  os.path.join(workdir, "figures"))
    print(f"[coord_check] wrote {path} and {len(figures)} figures")
    recorded = sorted(next(iter(results.values()))["steps"], key=int)
    print(format_table(results, tuple(s for s in recorded if s != "0"), table_rows(results)))
    return 0
