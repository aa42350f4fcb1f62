"""Every dispatch computes the dense function (outputs and gradients); capacity drops the
overflow."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import mlp_moe
from mssp_jax import dispatch, factory

SHAPES = [  # (T, N, Ne, M, K)
    (24, 8, 4, 4, 2),
    (16, 8, 4, 4, 4),  # K = M: soft routing
    (20, 8, 6, 8, 1),  # K = 1
    (40, 16, 8, 16, 3),
]
EXACT = ["sorted", "ragged", "capacity", "bucketed"]


def problem(t, n, ne, m, k, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (t, n))
    w_up = jax.random.normal(keys[1], (m, n, ne)) / np.sqrt(n)
    w_down = jax.random.normal(keys[2], (m, ne, n)) / np.sqrt(ne)
    _, idx = jax.lax.top_k(jax.random.normal(keys[3], (t, m)), k)
    weights = jax.nn.sigmoid(jax.random.normal(keys[4], (t, k)))
    return x, w_up, w_down, idx.astype(jnp.int32), weights


def outputs_and_grads(fn, x, w_up, w_down, idx, weights):
    """fn's outputs and the gradients of sum(sin(outputs)), in one compiled program."""

    def both(x, w_up, w_down, weights):
        out, pullback = jax.vjp(lambda *a: fn(*a[:3], idx, a[3], jax.nn.gelu), x, w_up, w_down,
                                weights)
        return out, pullback(jnp.cos(out))

    return jax.jit(both)(x, w_up, w_down, weights)


def apply(fn, x, w_up, w_down, idx, weights):
    return jax.jit(fn, static_argnums=5)(x, w_up, w_down, idx, weights, jax.nn.gelu)


@functools.cache
def dense_reference(shape):
    return outputs_and_grads(dispatch.dense, *problem(*shape))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", EXACT)
def test_matches_dense_outputs_and_grads(name, shape):
    args = problem(*shape)
    num_experts = shape[3]
    # capacity_factor = M gives every expert room for all T*K slots: nothing is dropped
    options = {"capacity_factor": float(num_experts)} if name == "capacity" else {}
    want = dense_reference(shape)
    got = outputs_and_grads(dispatch.get(name, **options), *args)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("tile", [1, 3, 64])
def test_sorted_is_exact_for_any_tile(tile):
    args = problem(*SHAPES[0])
    want = dense_reference(SHAPES[0])
    got = outputs_and_grads(functools.partial(dispatch.sorted_tiles, tile=tile), *args)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("routing", ["balanced", "one_expert", "between"])
def test_bucketed_takes_every_branch_and_stays_exact(routing):
    """Balanced routing fits the smallest buffer, all tokens on one expert fit none (sorted
    tiles), and a busiest expert between the two buffer sizes takes the second."""
    t, n, ne, m, k = 64, 8, 4, 8, 2
    x, w_up, w_down, _, weights = problem(t, n, ne, m, k)
    caps = dispatch.bucket_capacities(t * k, m)
    assert caps[:2] == [20, 24]  # ceil(1.25 * 128 / 8), ceil(1.5 * 128 / 8)
    first = np.arange(t) % m
    if routing == "one_expert":
        first = np.zeros(t, int)
    if routing == "between":  # expert 0: 22 first choices (over 20, within 24), others fewer
        first = np.where(np.arange(t) < 22, 0, 1 + np.arange(t) % (m - 1))
    load = np.bincount(first, minlength=m)
    second = []
    for e in first:  # the least-loaded other expert, never expert 0 in the 'between' case
        choice = min((x for x in range(m) if x != e and (routing != "between" or x)),
                     key=lambda x: load[x])
        load[choice] += 1
        second.append(choice)
    idx = jnp.asarray(np.stack([first, second], 1), jnp.int32)
    sizes = jnp.bincount(idx.reshape(-1), length=m)
    want_branch = {"balanced": 0, "between": 1, "one_expert": len(caps)}[routing]
    assert int(dispatch.bucket_index(sizes, caps)) == want_branch
    want = outputs_and_grads(dispatch.dense, x, w_up, w_down, idx, weights)
    got = outputs_and_grads(dispatch.bucketed, x, w_up, w_down, idx, weights)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


def test_bucket_sizes_stop_where_buffers_outgrow_sorted_tiles():
    """T*K = 4096: M = 8 has 4992 tile rows, so its 2x buffer (8192 rows) is left out; M = 64 has
    6080, so its 2x buffer (64 x 128 rows) is kept."""
    assert dispatch.bucket_capacities(4096, 8) == [640, 768]
    assert dispatch.bucket_capacities(4096, 64) == [80, 96, 128]


def test_bucketed_without_buckets_is_sorted():
    """With T*K slots no larger than the buffers (tiny layers) only the sorted branch is left."""
    assert dispatch.bucket_capacities(2, 2) == []
    x, w_up, w_down, idx, weights = problem(1, 8, 4, 2, 2)
    np.testing.assert_allclose(apply(dispatch.bucketed, x, w_up, w_down, idx, weights),
                               apply(dispatch.dense, x, w_up, w_down, idx, weights),
                               rtol=2e-5, atol=2e-5)


def test_sort_fallback_for_huge_keys_agrees(monkeypatch):
    idx = problem(*SHAPES[3])[3]
    packed = dispatch.group_slots(idx, 16)
    monkeypatch.setattr(dispatch, "PACKED_SORT_LIMIT", 0)
    for a, b in zip(packed, dispatch.group_slots(idx, 16)):
        np.testing.assert_array_equal(a, b)


def test_capacity_drops_exactly_the_overflow():
    """All tokens pick expert 0 first: with capacity C only the first C tokens (in order) keep their
    first choice; second choices, spread over experts, are all within capacity."""
    t, n, ne, m = 12, 8, 4, 4
    x, w_up, w_down, _, _ = problem(t, n, ne, m, 2)
    second = 1 + jnp.arange(t) % (m - 1)  # experts 1..3, 4 tokens each
    idx = jnp.stack([jnp.zeros(t, jnp.int32), second.astype(jnp.int32)], axis=1)
    weights = jnp.full((t, 2), 0.5)
    factor = 1.0  # capacity ceil(1.0 * 24 / 4) = 6 slots per expert
    cap = dispatch.capacity_per_expert(t * 2, m, factor)
    assert cap == 6
    got = apply(dispatch.get("capacity", capacity_factor=factor), x, w_up, w_down, idx, weights)
    kept = weights.at[cap:, 0].set(0.0)  # tokens 6.. lose their first choice
    np.testing.assert_allclose(got, apply(dispatch.dense, x, w_up, w_down, idx, kept),
                               rtol=2e-5, atol=2e-5)
    assert not np.allclose(got, apply(dispatch.dense, x, w_up, w_down, idx, weights))


def test_capacity_priority_is_first_choices_first():
    """Expert 0 is token 1's first choice and token 0's second: with room for one slot, the
    first choice wins although token 0 comes first."""
    x, w_up, w_down, _, _ = problem(2, 8, 4, 2, 2)
    idx = jnp.array([[1, 0], [0, 1]], jnp.int32)
    weights = jnp.ones((2, 2))
    got = apply(dispatch.get("capacity", capacity_factor=0.5), x, w_up, w_down, idx, weights)
    want = apply(dispatch.dense, x, w_up, w_down, idx, jnp.array([[1.0, 0.0], [1.0, 0.0]]))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_auto_is_an_exact_registered_dispatch():
    assert dispatch.get("auto") is dispatch.get(dispatch.AUTO[jax.default_backend()])
    assert dispatch.AUTO[jax.default_backend()] != "capacity"


def test_vmapped_bucketed_runs_sorted_tiles_for_every_run():
    """Under vmap over per-run routings (the LR/seed sweeps) a switch would become a select that
    runs every branch: `bucketed` runs only the sorted tiles, and stays exact, outputs and
    gradients, whether the weights are batched or shared."""
    runs, (t, n, ne, m, k) = 3, (64, 8, 4, 8, 2)
    per_run = [problem(t, n, ne, m, k, seed=s) for s in range(runs)]
    x, w_up, w_down, idx, weights = (jnp.stack(a) for a in zip(*per_run))
    assert len(dispatch.bucket_capacities(t * k, m)) > 0  # there are buffers to switch between

    def loss(fn, x, w_up, w_down, idx, weights):
        return jnp.sum(jnp.sin(fn(x, w_up, w_down, idx, weights, jax.nn.gelu)))

    for shared in (False, True):
        axes = (0, None, None, 0, 0) if shared else 0
        ws = (w_up[0], w_down[0]) if shared else (w_up, w_down)
        results, dots = {}, {}
        for name in ("bucketed", "sorted", "dense"):
            fn = functools.partial(loss, dispatch.get(name))
            batched = jax.vmap(jax.value_and_grad(fn, argnums=(0, 1, 2, 4)), in_axes=axes)
            compiled = jax.jit(batched).lower(x, *ws, idx, weights).compile()
            results[name] = compiled(x, *ws, idx, weights)
            dots[name] = len(re.findall(r"= \S+ dot\(", compiled.as_text()))
        assert dots["bucketed"] == dots["sorted"]  # all branches run: 26 against 8 (shared: False)
        for got, want in zip(jax.tree.leaves(results["bucketed"]),
                             jax.tree.leaves(results["dense"])):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_get_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"dispatch must be one of \['auto', 'dense'.*'nope'"):
        dispatch.get("nope")
    with pytest.raises(ValueError, match=r"takes options \['capacity_factor'\].*\['tile'\]"):
        dispatch.get("capacity", tile=4)
    with pytest.raises(ValueError, match=r"capacity_factor must be > 0"):
        dispatch.get("capacity", capacity_factor=0.0)


def test_get_returns_the_same_object_for_the_same_options():
    """Models built from equal configs get equal (static) dispatch attributes."""
    assert dispatch.get("capacity", capacity_factor=2.0) is dispatch.get("capacity",
                                                                         capacity_factor=2.0)


def test_config_selects_dispatch_and_capacity_factor():
    config = mlp_moe.get_config()
    config.dispatch, config.capacity_factor = "capacity", 2.0
    model = factory.build_model(config, nnx.Rngs(0))
    assert model.moe.dispatch is dispatch.get("capacity", capacity_factor=2.0)
    config.dispatch = "sorted"
    assert factory.build_model(config, nnx.Rngs(0)).moe.dispatch is dispatch.sorted_tiles
