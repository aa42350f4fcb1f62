"""Role-labelled parameters: created with their scaling rule, read back by the optimizer.

Every `nnx.Param` made here carries ``role`` (a key of `presets.ROLES`) and ``out_sharding``
(logical axis names, one per dim; Flax's own key, so `nnx.get_partition_spec` reads it). Kernels
are laid out ``(batch axes..., fan_in, fan_out)``; the batch axes (``expert``, ``layers``) are never
part of fan-in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mssp_jax.scaling import Scaling

BATCH_AXES = ("expert", "layers")


def fan_in(shape: Sequence[int], axes: Sequence[str | None]) -> int:
    """Fan-in of a kernel (second-to-last non-batch dim); 1 for vectors."""
    dims = [d for d, a in zip(shape, axes) if a not in BATCH_AXES]
    return dims[-2] if len(dims) >= 2 else 1


def sample_init(key: jax.Array, scaling: Scaling, role: str, shape: Sequence[int],
                axes: Sequence[str | None], dtype: Any = jnp.float32) -> jax.Array:
    """Samples the init of one tensor from its role's std rule (shared experts: one, broadcast)."""
    rule = scaling.std_rule(role)
    if rule == "zero":
        return jnp.zeros(shape, dtype)
    if rule == "one":
        return jnp.ones(shape, dtype)
    std = scaling.init_std(role, fan_in(shape, axes))
    if scaling.shared_expert_init and "expert" in axes:
        one_expert = list(shape)
        one_expert[list(axes).index("expert")] = 1
        return jnp.broadcast_to(std * jax.random.normal(key, one_expert, dtype), shape)
    return std * jax.random.normal(key, shape, dtype)


def labelled_param(rngs: nnx.Rngs, scaling: Scaling, role: str, shape: Sequence[int],
                   axes: Sequence[str | None], dtype: Any = jnp.float32) -> nnx.Param:
    """An `nnx.Param` initialised by `scaling` and labelled with its role and logical axes."""
    if len(shape) != len(axes):
        raise ValueError(f"{role}: shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
    value = sample_init(rngs.params(), scaling, role, shape, axes, dtype)
    return nnx.Param(value, role=role, out_sharding=tuple(axes), eager_sharding=False)


def is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def axes_of(var: nnx.Variable) -> tuple[str | None, ...] | None:
    """A Param's axis names: the size axes `labelling.label` gave it, else its logical axes
    (``layers`` leading when `nnx.vmap` stacked it); None when it has neither."""
    meta = var.get_metadata()
    axes = meta.get("size_axes") or meta.get("out_sharding")
    return tuple(axes) if axes else None


def weight_rank(x: Any) -> int:
    """The dims of one parameter's weight: a labelled Param's dims other than its batch axes
    (stacked experts or layers), a plain array's ndim."""
    axes = axes_of(x) if is_variable(x) else None
    if axes is None:
        return getattr(x, "ndim", 0)
    return sum(a not in BATCH_AXES for a in axes)


def param_state(tree: Any) -> nnx.State:
    """The Param state of a module, or `tree` itself when it already is a state."""
    return nnx.state(tree, nnx.Param) if isinstance(tree, nnx.Module) else tree


def role_labels(tree: Any) -> Any:
    """A pytree of role strings, one per Param, matching `nnx.state(model, nnx.Param)`.

    Raises listing every parameter path that carries no (or an unknown) role: a parameter without
    a label must never silently get a multiplier of 1.
    """
    from mssp_jax.presets import ROLES

    state = param_state(tree)
    missing = []

    def label(path, var):
        role = var.get_metadata().get("role") if is_variable(var) else None
        if role not in ROLES:
            missing.append(f"{jax.tree_util.keystr(path)} (role={role!r})")
        return role

    labels = jax.tree.map_with_path(label, state, is_leaf=is_variable)
    if missing:
        raise ValueError("parameters without a known role label; allowed roles "
                         f"{list(ROLES)}:\n  " + "\n  ".join(missing))
    return labels


def logical_axes(tree: Any) -> Any:
    """A pytree of logical axis-name tuples, one per Param."""
    return jax.tree.map(lambda v: v.get_metadata().get("out_sharding"), param_state(tree),
                        is_leaf=is_variable)
