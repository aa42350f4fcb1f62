"""Expert-parallel (shard_map + all_to_all) and token-parallel dispatch against the single-device
dispatches.

Tolerance 1e-5 (relative, and absolute for entries near 0): only the order of float32 sums
differs (per-shard partial sums, the tensor-axis psum); weight gradients sum T = 32 terms of size
~1, so a few ulps each gives ~1e-6 (measured max 1.4e-6). A misrouted token changes entries by ~1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from mssp_jax import dispatch, expert_parallel, sharding
from mssp_jax.moe import route

T, N, NE, M, K = 32, 8, 4, 8, 2
RTOL, ATOL = 1e-5, 1e-5


def mesh(data=1, fsdp=1, expert=1, tensor=1):
    return jax.make_mesh((data, fsdp, expert, tensor), sharding.MESH_AXES,
                         axis_types=(AxisType.Auto,) * 4)


def problem():
    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (T, N))
    w_up = jax.random.normal(ks[1], (M, N, NE)) / np.sqrt(N)
    w_down = jax.random.normal(ks[2], (M, NE, N)) / np.sqrt(NE)
    routing = route(jax.random.normal(ks[3], (T, M)), K, 1.0)
    return x, w_up, w_down, routing.idx, routing.weights


@functools.cache
def dense_value_and_grads():
    return value_and_grads(dispatch.dense)


def value_and_grads(fn):
    x, w_up, w_down, idx, weights = problem()

    def loss(x, w_up, w_down, weights):
        return jnp.sum(jnp.sin(fn(x, w_up, w_down, idx, weights, jax.nn.gelu)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, w_up, w_down, weights)


@pytest.mark.parametrize("axes", [dict(data=2, expert=4), dict(fsdp=2, expert=2, tensor=2)])
def test_dropless_equals_dense_with_gradients(axes):
    want = dense_value_and_grads()
    got = value_and_grads(expert_parallel.make_dispatch(mesh(**axes)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), got, want)


def test_registered_name_uses_the_context_mesh():
    x, w_up, w_down, idx, weights = problem()
    registered = jax.jit(lambda *a: dispatch.get("expert_parallel")(*a, jax.nn.gelu))
    with jax.set_mesh(mesh(expert=8)):
        got = registered(x, w_up, w_down, idx, weights)
    want = dispatch.dense(x, w_up, w_down, idx, weights, jax.nn.gelu)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="mesh"):
        registered(x, w_up, w_down, idx, weights)


@pytest.mark.parametrize("name", ["sorted", "dense", "bucketed"])
def test_token_parallel_equals_one_device_with_gradients(name):
    """Meshes that do not split the experts: the dispatch on each device's tokens, the experts'
    hidden dim split over tensor (psum), N gathered from fsdp."""
    fn = expert_parallel.make_token_parallel(dispatch.get(name), mesh(data=2, fsdp=2, tensor=2))
    got, want = value_and_grads(fn), dense_value_and_grads()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), got, want)


@pytest.mark.parametrize("on_mesh", [
    lambda capacity: expert_parallel.make_dispatch(mesh(data=2, expert=4), capacity_factor=1.0),
    lambda capacity: expert_parallel.make_token_parallel(capacity, mesh(data=2, fsdp=4)),
], ids=["expert_parallel", "token_parallel"])
def test_capacity_drops_like_capacity_dispatch_on_each_token_shard(on_mesh):
    x, w_up, w_down, idx, weights = problem()
    fn = on_mesh(dispatch.get("capacity", capacity_factor=1.0))
    got = jax.jit(lambda *a: fn(*a, jax.nn.gelu))(x, w_up, w_down, idx, weights)
    per_shard = dispatch.get("capacity", capacity_factor=1.0)
    shards = [slice(i * T // 8, (i + 1) * T // 8) for i in range(8)]
    want = jnp.concatenate([per_shard(x[s], w_up, w_down, idx[s], weights[s], jax.nn.gelu)
                            for s in shards])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    dense = dispatch.dense(x, w_up, w_down, idx, weights, jax.nn.gelu)
    assert not np.allclose(got, dense, atol=1e-3)  # some slots were really dropped


def test_experts_not_divisible_by_expert_axis_is_named():
    x, w_up, w_down, idx, weights = problem()
    with pytest.raises(Exception, match=r"mesh\.expert"):
        expert_parallel.make_dispatch(mesh(expert=8))(x, w_up[:4], w_down[:4], idx % 4, weights,
                                                      jax.nn.gelu)
