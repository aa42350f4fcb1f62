"""Expert parallelism: each device owns M/E experts and receives, by all_to_all, the tokens routed
to them. On meshes that do not split the experts, `token_parallel` runs any dispatch on each
device's own tokens.

Layout inside `jax.shard_map` on a mesh with an ``expert`` axis of size E:

* tokens (and their routing) are split over the batch axes (``data``, ``fsdp``, ``expert``): the
  expert axis also carries the batch, so no device repeats another's attention work;
* expert weights ``w_up [M, N, Ne]`` / ``w_down [M, Ne, N]`` are split over ``expert`` (device e
  owns experts ``e*M/E ... (e+1)*M/E - 1``) and their hidden dim over ``tensor`` (partial outputs
  summed by a psum); an ``fsdp`` split of N is gathered at the shard_map boundary.

Each device packs its token-slots into a fixed ``[M, C, N]`` buffer (one block of C rows per
expert; `ragged_all_to_all` has no CPU lowering, so the buffer size is static), swaps blocks with
one all_to_all, runs its own experts, and swaps the results back. C is

* dropless (``capacity_factor <= 0``): the local token count, the worst case (top-k experts are
  distinct, so one expert gets at most one slot per token). Exact: equals `dispatch.dense`;
* ``ceil(capacity_factor * T_local*K / M)``: slots past an expert's C (priority: first choices
  first, in token order) are dropped, exactly as `dispatch.capacity` does on each token shard.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from mssp_jax import dispatch as dispatch_lib
from mssp_jax.scaling import ConfigError

EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"
TOKEN_AXES = ("data", "fsdp", "expert")  # mesh axes that split the tokens (the batch)


def buffer_rows(local_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Rows C per expert block: the local token count (dropless) or the GShard capacity."""
    if capacity_factor <= 0:
        return local_tokens
    return dispatch_lib.capacity_per_expert(local_tokens * top_k, num_experts, capacity_factor)


def _local_dispatch(x: jax.Array, w_up: jax.Array, w_down: jax.Array, idx: jax.Array,
                    weights: jax.Array, *, act: dispatch_lib.Activation, num_experts: int,
                    capacity_factor: float, tensor: bool) -> jax.Array:
    """One device: pack slots into [M, C, N], all_to_all, local experts, all_to_all back."""
    num_tokens, top_k = idx.shape
    shards, local_experts = num_experts // w_up.shape[0], w_up.shape[0]
    cap = buffer_rows(num_tokens, top_k, num_experts, capacity_factor)
    slots = dispatch_lib.group_slots(idx, num_experts)
    valid = slots.rank < cap
    rows = jnp.where(valid, slots.expert * cap + slots.rank, num_experts * cap)  # last row: dropped
    send = jnp.zeros((num_experts * cap + 1, x.shape[1]), x.dtype).at[rows].set(x[slots.token])
    send = send[:-1].reshape(shards, local_experts, cap, -1)  # [owner, local expert, C, N]
    received = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True)  # [source, local, C, N]
    hidden = act(jnp.einsum("sjcn,jne->sjce", received, w_up))
    out = jnp.einsum("sjce,jen->sjcn", hidden, w_down)
    back = jax.lax.all_to_all(out, EXPERT_AXIS, 0, 0, tiled=True).reshape(num_experts * cap, -1)
    y_slots = jnp.where(valid[:, None], back[jnp.minimum(rows, num_experts * cap - 1)], 0)
    y = jnp.einsum("ktn,tk->tn", y_slots.reshape(top_k, num_tokens, -1), weights)
    return jax.lax.psum(y, TENSOR_AXIS) if tensor else y


def _token_and_tensor_specs(mesh: Mesh) -> tuple[P, str | None]:
    """Tokens split over the mesh's batch axes; the tensor axis, if the mesh has one."""
    tokens = P(tuple(a for a in TOKEN_AXES if a in mesh.axis_names))
    return tokens, TENSOR_AXIS if TENSOR_AXIS in mesh.axis_names else None


def expert_parallel(x: jax.Array, w_up: jax.Array, w_down: jax.Array, idx: jax.Array,
                    weights: jax.Array, act: dispatch_lib.Activation, *, mesh: Mesh | None = None,
                    capacity_factor: float = 0.0) -> jax.Array:
    """`dispatch.dense`'s signature; the mesh is `mesh` or the one set by `jax.set_mesh`."""
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh.empty or EXPERT_AXIS not in mesh.axis_names:
        raise ValueError("expert_parallel dispatch needs a mesh with an 'expert' axis: pass "
                         "mesh= (make_dispatch) or call under `jax.set_mesh(mesh)`")
    num_experts, shards = w_up.shape[0], mesh.shape[EXPERT_AXIS]
    if num_experts % shards:
        raise ConfigError(f"shape.num_experts (M={num_experts}) must be divisible by mesh.expert "
                          f"({shards}); allowed mesh.expert: divisors of {num_experts}")
    tokens, tensor = _token_and_tensor_specs(mesh)
    local = functools.partial(_local_dispatch, act=act, num_experts=num_experts,
                              capacity_factor=capacity_factor, tensor=tensor is not None)
    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(tokens, P(EXPERT_AXIS, None, tensor), P(EXPERT_AXIS, tensor, None), tokens,
                  tokens),
        out_specs=tokens)(x, w_up, w_down, idx, weights)


def make_dispatch(mesh: Mesh, capacity_factor: float = 0.0) -> dispatch_lib.Dispatch:
    """An expert-parallel dispatch bound to `mesh` (dropless when capacity_factor <= 0)."""
    return functools.partial(expert_parallel, mesh=mesh, capacity_factor=capacity_factor)


def token_parallel(x: jax.Array, w_up: jax.Array, w_down: jax.Array, idx: jax.Array,
                   weights: jax.Array, act: dispatch_lib.Activation, *,
                   dispatch: dispatch_lib.Dispatch, mesh: Mesh) -> jax.Array:
    """`dispatch` run on each device's own tokens, for meshes that do not split the experts.

    Routing stays on the device: no sort or scatter over tokens spread across devices, which
    XLA can only partition by replicating them (it warns of "involuntary full
    rematerialization" on data x fsdp meshes), and kernels that cannot be partitioned
    automatically (Pallas grouped matmuls) see one device's tokens. The experts are gathered
    from ``fsdp`` at the boundary; their hidden dim stays split over ``tensor`` (a psum sums the
    partial outputs). Exact for every exact dispatch; ``capacity`` counts its capacity per
    device, as GShard does.
    """
    tokens, tensor = _token_and_tensor_specs(mesh)

    def local(x, w_up, w_down, idx, weights):
        y = dispatch(x, w_up, w_down, idx, weights, act)
        return jax.lax.psum(y, TENSOR_AXIS) if tensor else y

    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(tokens, P(None, None, tensor), P(None, tensor, None), tokens, tokens),
        out_specs=tokens)(x, w_up, w_down, idx, weights)


def make_token_parallel(dispatch: dispatch_lib.Dispatch, mesh: Mesh) -> dispatch_lib.Dispatch:
    """`dispatch` bound to run per device on `mesh` (`token_parallel`)."""
    return functools.partial(token_parallel, dispatch=dispatch, mesh=mesh)


dispatch_lib.register("expert_parallel", expert_parallel)
