"""`describe`: one row per parameter with its role and its resolved scaling numbers.

Keys relied on by users and tests: path, role, shape, init_std, multiplier, lr_scale, eps_scale,
and, given the base LR and eps, the absolute ``lr`` and ``eps`` a parameter trains with (what to
hold against a paper's numbers).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from mssp_jax.params import axes_of, fan_in, param_state
from mssp_jax.scaling import Scaling


def describe(model: Any, scaling: Scaling, base_lr: float | None = None,
             base_eps: float | None = None) -> list[dict[str, Any]]:
    """Rows for every Param of `model` (an nnx.Module or its Param state), in path order; with
    `base_lr` / `base_eps` also the absolute per-parameter LR and Adam eps."""
    rows = []
    flat = jax.tree_util.tree_flatten_with_path(
        param_state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    for path, var in flat:
        meta = var.get_metadata()
        # Models labelled by `mssp_jax.labelling.label` carry their size axes and fan-in.
        role, shape = meta.get("role"), tuple(var.shape)
        axes = axes_of(var)
        init = scaling.std_rule(role)
        fan = meta.get("fan_in") or fan_in(shape, axes or (None,) * len(shape))
        rows.append({
            "path": "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path),
            "role": role,
            "shape": list(shape),
            "axes": list(axes) if axes else None,
            "fan_in": fan,
            "init": init if init in ("zero", "one") else
            ("shared_normal" if scaling.shared_expert_init and axes and "expert" in axes
             else "normal"),
            "init_std": scaling.init_std(role, fan),
            "multiplier": scaling.multiplier(role),
            "lr_scale": scaling.lr_scale(role),
            "eps_scale": scaling.eps_scale(role),
        })
        if base_lr is not None:
            rows[-1]["lr"] = base_lr * rows[-1]["lr_scale"]
        if base_eps is not None and scaling.optimizer == "adam":
            rows[-1]["eps"] = base_eps * rows[-1]["eps_scale"]
    return rows


def format_table(rows: list[dict[str, Any]], scaling: Scaling) -> str:
    """A readable table of `describe` rows, headed by the resolved setting."""
    s, b = scaling.shape, scaling.base
    head = (f"parameterization={scaling.name} regime={scaling.regime} "
            f"optimizer={scaling.optimizer} "
            f"depth={scaling.depth} gate_scale={scaling.gate_scale:.6g}\n"
            f"shape N={s.N} Ne={s.Ne} M={s.M} K={s.K} L={s.L}   "
            f"base N={b.N} Ne={b.Ne} M={b.M} K={b.K} L={b.L}")
    cols = ("path", "role", "shape", "init", "init_std", "multiplier", "lr_scale", "eps_scale")
    cols += tuple(c for c in ("lr", "eps") if rows and c in rows[0])
    cells = [[str(r[c]) if not isinstance(r[c], float) else f"{r[c]:.6g}" for c in cols]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([head, line(cols), line(["-" * w for w in widths]), *map(line, cells)])
