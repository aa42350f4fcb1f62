"""Labelling models we did not write: state each parameter's role once, then use MSSP as usual.

Our own models create every parameter with its role (`params.labelled_param`). A third-party
model does not, so its user states the roles once, in either or both of two ways:

* path patterns, ``{"*/router/kernel": "router", "*/experts/wi": ("expert_up", ("expert",
  "in", "out"))}``: `fnmatch` globs on the ``/``-joined parameter path (``*`` also crosses
  ``/``), each naming a role and optionally the size axes;
* initialiser wrappers, where the model is built: `with_role` (NNX, via `nnx.with_metadata`) and
  `linen_with_role` (Linen, a boxed value like `nn.with_partitioning`).

The *size axes* say what each tensor dim is for scaling: ``in`` (fan-in; several ``in`` dims
multiply), ``out`` (fan-out), ``expert`` (stacked experts) or ``layers`` (stacked/scanned layers).
The last two are batch axes and never part of fan-in. Axes may be omitted for vectors (``out``),
matrices (``in, out``) and 3-D expert tensors (``expert, in, out``).

`label` returns the parameter tree with every leaf an `nnx.Param` carrying ``role``,
``size_axes`` and ``fan_in``, so `params.role_labels`, `describe.describe`, `optim.adamw` and
`reinit` treat the model like one of ours. Every parameter must get exactly one role: an
uncovered or doubly-labelled parameter, or a pattern that labels nothing, is an error listing
the paths, because a silent default multiplier of 1 is the bug muP setups are known for.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from mssp_jax.params import param_state, sample_init
from mssp_jax.presets import ROLES
from mssp_jax.scaling import ConfigError, Scaling

SIZE_AXES = ("in", "out", "expert", "layers")
SIZE_AXES_KEY = "size_axes"
# Pass as ``transform_metadata`` to `nnx.vmap` / `nnx.scan` that stack layers, so the new leading
# axis is recorded as a ``layers`` batch axis in the `with_role` metadata.
NNX_STACKED_LAYERS = {nnx.PARTITION_NAME: "layers", SIZE_AXES_KEY: "layers"}

Axes = tuple[str, ...]
Rule = str | tuple[str, Sequence[str] | None]


def default_axes(role: str, ndim: int) -> Axes | None:
    """The size axes assumed when none are given; None where a guess would be unsafe."""
    if ndim == 1:
        return ("out",)
    if ndim == 2:
        return ("in", "out")
    if ndim == 3 and role in ("expert_up", "expert_down"):
        return ("expert", "in", "out")
    return None


def _check_role(role: Any, where: str) -> str:
    if role not in ROLES:
        raise ConfigError(f"{where}: unknown role {role!r}; allowed: {list(ROLES)}")
    return role


def _check_axes(axes: Sequence[str], ndim: int | None, where: str) -> Axes:
    """Known axis names and, when `ndim` is given, one per tensor dim."""
    axes = tuple(axes)
    bad = [a for a in axes if a not in SIZE_AXES]
    if bad:
        raise ConfigError(f"{where}: unknown size axes {bad}; allowed: {list(SIZE_AXES)}")
    if ndim is not None and len(axes) != ndim:
        raise ConfigError(f"{where}: size axes {axes} name {len(axes)} dims, the tensor has {ndim}")
    return axes


def with_role(init: Callable[..., jax.Array], role: str,
              axes: Sequence[str] | None = None) -> Callable[..., Any]:
    """An NNX initialiser whose Param carries ``role`` and ``size_axes`` metadata.

    Use it like `nnx.with_partitioning`: ``nnx.Linear(..., kernel_init=with_role(init, "router"))``.
    Axes default from the created tensor's rank (see `default_axes`).
    """
    _check_role(role, "with_role")
    if axes is not None:
        _check_axes(axes, None, "with_role")

    def initialiser(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Any:
        resolved = tuple(axes) if axes is not None else default_axes(role, len(shape))
        return nnx.with_metadata(init, role=role, size_axes=resolved)(key, shape, dtype)

    return initialiser


class RoleBox(struct.PyTreeNode, nn.meta.AxisMetadata):
    """A Linen parameter boxed with its role and size axes (unbox with `flax.linen.unbox`).

    `nn.scan` / `nn.vmap` stacking adds a batch axis: ``expert`` if their ``metadata_params``
    name the partition ``"expert"``, else ``layers``.
    """

    value: Any
    role: str = struct.field(pytree_node=False)
    size_axes: Axes | None = struct.field(pytree_node=False)

    def unbox(self) -> Any:
        return self.value

    def replace_boxed(self, val: Any) -> RoleBox:
        return self.replace(value=val)

    def add_axis(self, index: int, params: dict[Any, Any]) -> RoleBox:
        kind = "expert" if params.get(nn.PARTITION_NAME) == "expert" else "layers"
        if self.size_axes is None:
            return self
        axes = list(self.size_axes)
        axes.insert(index, kind)
        return self.replace(size_axes=tuple(axes))

    def remove_axis(self, index: int, params: dict[Any, Any]) -> RoleBox:
        if self.size_axes is None:
            return self
        return self.replace(size_axes=self.size_axes[:index] + self.size_axes[index + 1:])


def linen_with_role(init: Callable[..., jax.Array], role: str,
                    axes: Sequence[str] | None = None) -> Callable[..., RoleBox]:
    """A Linen initialiser returning a `RoleBox`; use it like `nn.with_partitioning`."""
    _check_role(role, "linen_with_role")
    if axes is not None:
        _check_axes(axes, None, "linen_with_role")

    def initialiser(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> RoleBox:
        value = init(key, shape, dtype)
        resolved = tuple(axes) if axes is not None else default_axes(role, value.ndim)
        return RoleBox(value, role, resolved)

    return initialiser


def _is_leaf(x: Any) -> bool:
    return isinstance(x, (nnx.Variable, nn.meta.AxisMetadata))


def _stated(leaf: Any) -> tuple[Any, dict[str, Any]]:
    """(value, metadata) of one leaf; the metadata holds the wrapper's role, if any."""
    if isinstance(leaf, nnx.Variable):
        return leaf.get_value(), leaf.get_metadata()
    if isinstance(leaf, RoleBox):
        return leaf.value, {"role": leaf.role, SIZE_AXES_KEY: leaf.size_axes}
    if isinstance(leaf, nn.meta.AxisMetadata):
        return leaf.unbox(), {}
    return leaf, {}


def _labelled(leaf: Any, value: Any, **labels: Any) -> nnx.Variable:
    """An NNX Variable keeps its type and metadata (e.g. its sharding); anything else is wrapped."""
    if isinstance(leaf, nnx.Variable):
        copy = leaf.copy()
        copy.set_metadata(**labels)
        return copy
    return nnx.Param(value, eager_sharding=False, **labels)


def _parse_rule(pattern: str, rule: Rule) -> tuple[str, Sequence[str] | None]:
    if isinstance(rule, str):
        return _check_role(rule, f"pattern {pattern!r}"), None
    if isinstance(rule, tuple) and len(rule) == 2:
        return _check_role(rule[0], f"pattern {pattern!r}"), rule[1]
    raise ConfigError(f"pattern {pattern!r}: the rule must be a role or (role, axes), got {rule!r}")


def label(params: Any, patterns: Mapping[str, Rule] | None = None) -> Any:
    """`params` with every leaf an `nnx.Param` labelled with role, size_axes and fan_in.

    `params` is an `nnx.Module` (its Params), an `nnx.State`, or a Linen param dict (plain
    arrays, `RoleBox`es or other Flax boxes). Roles come from the wrappers and from `patterns`
    (path glob -> role or (role, axes)). Raises `ConfigError` listing every uncovered or
    doubly-labelled path, every pattern that labels nothing, and every bad axes spec.
    """
    rules = {p: _parse_rule(p, r) for p, r in (patterns or {}).items()}
    flat, treedef = jax.tree_util.tree_flatten_with_path(param_state(params), is_leaf=_is_leaf)
    used: set[str] = set()
    uncovered, doubled, bad_axes, leaves = [], [], [], []
    for path, leaf in flat:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        value, meta = _stated(leaf)
        sources = []  # (what labelled it, role, axes): a wrapper's metadata and/or patterns
        if (stated := meta.get("role")) is not None:
            sources.append((f"role metadata {stated!r}", stated, meta.get(SIZE_AXES_KEY)))
        for pattern, (role, axes) in rules.items():
            if fnmatch.fnmatchcase(name, pattern):
                used.add(pattern)
                sources.append((f"{pattern!r}", role, axes))
        if not sources:
            uncovered.append(name)
            continue
        if len(sources) > 1:
            doubled.append(f"{name}: {', '.join(s[0] for s in sources)}")
            continue
        _, role, axes = sources[0]
        axes = axes if axes is not None else default_axes(role, np.ndim(value))
        if axes is None:
            bad_axes.append(f"{name}: role {role!r} on a rank-{np.ndim(value)} tensor needs "
                            f"explicit size axes from {list(SIZE_AXES)}")
            continue
        try:
            axes = _check_axes(axes, np.ndim(value), name)
        except ConfigError as err:
            bad_axes.append(str(err))
            continue
        fan = math.prod(d for d, a in zip(np.shape(value), axes) if a == "in")
        leaves.append(_labelled(leaf, value, role=role, size_axes=axes, fan_in=fan))
    unused = [repr(p) for p in rules if p not in used]
    problems = [(f"uncovered parameters (give each a role from {list(ROLES)})", uncovered),
                ("parameters labelled more than once", doubled),
                ("patterns that match no parameter", unused),
                ("bad size axes", bad_axes)]
    message = "\n".join(f"{title}:\n  " + "\n  ".join(items) for title, items in problems if items)
    if message:
        raise ConfigError(message)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _sample(key: jax.Array, scaling: Scaling, meta: Mapping[str, Any], shape: Sequence[int],
            dtype: Any) -> jax.Array:
    """One tensor's init: sampled as (batch..., fan_in, fan_out), then laid back out."""
    axes = meta[SIZE_AXES_KEY]
    batch = [i for i, a in enumerate(axes) if a in ("expert", "layers")]
    ins = [i for i, a in enumerate(axes) if a == "in"]
    outs = [i for i, a in enumerate(axes) if a == "out"]
    order = batch + ins + outs
    canonical = [shape[i] for i in batch] + [meta["fan_in"], math.prod(shape[i] for i in outs)]
    canonical_axes = [axes[i] for i in batch] + ["in", "out"]
    value = sample_init(key, scaling, meta["role"], canonical, canonical_axes, dtype)
    return jnp.transpose(value.reshape([shape[i] for i in order]), np.argsort(order))


def reinit(labelled: Any, scaling: Scaling, key: jax.Array) -> Any:
    """Fresh values from `scaling`'s init rules (zero router, sqrt(M) expert_down, shared experts).

    `labelled` comes from `label`; the result has its structure with arrays in place of Params:
    for NNX ``nnx.update(model, reinit(...))``, for Linen it is the new param dict. All tensors
    are sampled by one jitted program (one compile, not one per tensor).
    """
    flat, treedef = jax.tree_util.tree_flatten(labelled, is_leaf=_is_leaf)
    specs = [(v.get_metadata(), tuple(v.shape), v.get_value().dtype) for v in flat]

    @jax.jit
    def sample_all(key: jax.Array) -> list[jax.Array]:
        keys = jax.random.split(key, len(specs))
        return [_sample(k, scaling, *spec) for k, spec in zip(keys, specs)]

    return jax.tree_util.tree_unflatten(treedef, sample_all(key))
