"""Placement: a config-driven device mesh and where every array lives on it, by logical axes.

Every run is on a mesh (one device is the trivial mesh); `mssp_jax.train` jits its steps with the
shardings made here. Parameters are placed by their logical-axis labels; activations are pinned by
`models.constrain` to the same rules, which `activation_rules` puts in context while a step is
traced.

Mesh axes (config ``mesh.<axis>``, sizes; -1 = the remaining devices):

* ``data``: pure data parallelism (batch split, parameters replicated);
* ``fsdp``: batch split *and* parameters split on their ``embed`` dim (gathered per use, FSDP);
* ``expert``: batch split and the stacked experts split on their ``expert`` dim; tokens reach their
  experts by all_to_all (`mssp_jax.expert_parallel`; dropless unless ``dispatch='capacity'``);
* ``tensor``: attention heads, dense-FFN and expert hidden dims split (Megatron-style).

The rules are data (`LOGICAL_RULES`), read by Flax's own `nnx.get_partition_spec`, so the role
labels and logical axes that carry the scaling rules also decide the placement.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mssp_jax import expert_parallel
from mssp_jax.moe import MoE
from mssp_jax.scaling import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = expert_parallel.TOKEN_AXES  # the batch is split over data x fsdp x expert
LOGICAL_RULES = (  # logical axis (params.py labels) -> mesh axis; None = replicated
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("expert", "expert"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("expert_mlp", "tensor"),
    ("vocab", None),
    ("head_dim", None),
    ("expert_router", None),
    ("input", None),
    ("classes", None),
    ("layers", None),
)


def mesh_shape(config: Any) -> dict[str, int]:
    """Axis sizes from ``config.mesh`` (-1 resolved); errors name the field and the device count."""
    devices = jax.device_count()
    fields = config.get("mesh") or {}
    sizes = {a: fields.get(a, 1) for a in MESH_AXES}
    for axis, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ConfigError(f"mesh.{axis} must be a positive integer or -1 (the remaining "
                              f"devices), got {size!r}")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got {['mesh.' + a for a in fill]}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if devices % fixed:
        raise ConfigError(f"mesh axis sizes {sizes} (product {fixed}) must divide the device "
                          f"count {devices}; allowed products: divisors of {devices}")
    if fill:
        sizes[fill[0]] = devices // fixed
    if jax.process_count() > 1 and math.prod(sizes.values()) != devices:
        raise ConfigError(f"on {jax.process_count()} processes the mesh must use all {devices} "
                          f"devices, got mesh {sizes}")
    return sizes


def validate_mesh(config: Any, sizes: dict[str, int]) -> None:
    """Model and batch sizes the mesh must divide (checked before any compute)."""
    experts = config.shape.num_experts
    if experts % sizes["expert"]:
        raise ConfigError(f"shape.num_experts (M={experts}) must be divisible by mesh.expert "
                          f"({sizes['expert']}); allowed mesh.expert: divisors of {experts}")
    batch_shards = math.prod(sizes[a] for a in BATCH_AXES)
    if config.batch_size % batch_shards:
        raise ConfigError(f"batch_size ({config.batch_size}) must be divisible by mesh.data x "
                          f"mesh.fsdp x mesh.expert ({batch_shards})")


def make_mesh(config: Any) -> Mesh:
    """The `jax.sharding.Mesh` of ``config.mesh`` over the first prod(sizes) devices."""
    sizes = mesh_shape(config)
    validate_mesh(config, sizes)
    count = math.prod(sizes.values())
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * 4,
                         devices=jax.devices()[:count])


def _spec_errors(path: str, shape: tuple[int, ...], axes: tuple, spec: P, mesh: Mesh) -> list:
    """Names of dims whose size the mesh axes they are split over do not divide."""
    errors = []
    for dim, name, mesh_axes in zip(shape, axes, spec):
        names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes or ()
        shards = math.prod(mesh.shape[a] for a in names)
        if dim % shards:
            errors.append(f"{path}: dim {name!r} of size {dim} is split over "
                          f"{['mesh.' + a for a in names]} ({shards} shards)")
    return errors


def param_specs(state: Any, mesh: Mesh, rules: tuple = LOGICAL_RULES) -> Any:
    """A pure tree of PartitionSpecs, one per Param, from its ``out_sharding`` labels."""
    known = {name for name, _ in rules}
    with nnx.logical_axis_rules(rules):
        specs = nnx.as_pure(nnx.get_partition_spec(state))
    errors = []

    def check(path, var, spec):
        axes, shape = var.get_metadata().get("out_sharding") or (), var.shape
        unknown = [a for a in axes if a is not None and a not in known]
        if unknown:
            errors.append(f"{jax.tree_util.keystr(path)}: logical axes {unknown} have no rule; "
                          f"known: {sorted(known)}")
        errors.extend(_spec_errors(jax.tree_util.keystr(path), shape, axes, spec, mesh))

    jax.tree.map_with_path(check, state, specs, is_leaf=lambda x: isinstance(x, nnx.Variable))
    if errors:
        raise ConfigError("parameters do not fit the mesh:\n  " + "\n  ".join(errors))
    return specs


def param_shardings(state: Any, mesh: Mesh, rules: tuple = LOGICAL_RULES) -> Any:
    """A pure tree of NamedShardings, one per Param of `state` (a module or nnx.State)."""
    state = nnx.state(state, nnx.Param) if isinstance(state, nnx.Module) else state
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(state, mesh, rules))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Batch (leading) dim split over data x fsdp x expert, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def use_mesh_dispatch(model: nnx.Module, mesh: Mesh, capacity_factor: float = 0.0) -> None:
    """Routes every MoE layer's tokens on `mesh`: by all_to_all when ``mesh.expert > 1``
    (`expert_parallel.expert_parallel`), else with its own dispatch on each device's tokens
    (`expert_parallel.token_parallel`); unchanged on one device."""
    if mesh.size == 1:
        return
    for _, module in nnx.iter_modules(model):
        if isinstance(module, MoE):
            module.dispatch = (expert_parallel.make_dispatch(mesh, capacity_factor)
                               if mesh.shape["expert"] > 1
                               else expert_parallel.make_token_parallel(module.dispatch, mesh))


def shard_model(model: nnx.Module, mesh: Mesh, rules: tuple = LOGICAL_RULES,
                capacity_factor: float = 0.0) -> nnx.Module:
    """Moves `model`'s Params onto `mesh` as their labels ask (in place) and routes its MoE
    layers' tokens on the mesh (`use_mesh_dispatch`)."""
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(nnx.as_pure(state), param_shardings(state, mesh, rules)))
    use_mesh_dispatch(model, mesh, capacity_factor)
    return model


def state_shardings(tx: optax.GradientTransformation, params: nnx.State, mesh: Mesh) -> Any:
    """Shardings of ``{'params', 'opt_state'}``: optimizer moments follow their parameter,
    counters are replicated."""
    shardings = param_shardings(params, mesh)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731  (optax.partition's holes)
    opt_state = jax.eval_shape(tx.init, nnx.as_pure(params))
    return {"params": shardings, "opt_state": optax.tree_map_params(
        tx, lambda p, s: p if masked(p) else s, opt_state, shardings,
        transform_non_params=lambda _: NamedSharding(mesh, P()), is_leaf=masked)}


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: tuple = LOGICAL_RULES) -> Iterator[None]:
    """Inside a step being traced: the mesh (abstract) and the logical-axis rules that
    `models.constrain` reads to pin activations to the same layout rules as the parameters."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nnx.logical_axis_rules(rules):
        yield


def global_batch(local_batch: Any, batch_sharding: NamedSharding) -> Any:
    """This process's slice of the batch (numpy, `data.Batches`) -> global arrays split over
    the batch axes."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        batch_sharding, np.asarray(x)), local_batch)


def initialize_distributed(config: Any) -> None:
    """`jax.distributed.initialize` when ``config.distributed.initialize`` is set; must run
    before any other JAX call. Empty fields are auto-detected (TPU pods, SLURM, ...)."""
    dist = config.get("distributed")
    if not dist or not dist.get("initialize", False):
        return
    kwargs = dict(coordinator_address=dist.get("coordinator_address") or None,
                  num_processes=dist.get("num_processes") or None,
                  process_id=None if dist.get("process_id", -1) < 0 else dist.process_id)
    jax.distributed.initialize(**kwargs)


def is_main_process() -> bool:
    """Only process 0 writes logs, plots and summaries."""
    return jax.process_index() == 0
