"""Mixed precision (``compute_dtype='bfloat16'``): float32 master parameters and optimizer state,
bfloat16 matmuls, float32 router / norms / softmax / logits / loss.

Tolerance: bfloat16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per product input), so
the two runs drift apart by a few tenths of a percent of the loss; measured on this model over 100
steps: <= 0.62% at any step, 0.14% over the last 10 steps. We allow 2% per step and 1% on the mean
of the last 10: a float32 op fed bfloat16 by mistake in the router or the loss shows up as
changed routing, which moves the loss by whole percents within a few steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import transformer_moe
from mssp_jax import data, factory, optim, train
from mssp_jax.scaling import ConfigError

STEPS, STEP_RTOL, TAIL_RTOL = 100, 2e-2, 1e-2


def config(dtype: str):
    c = transformer_moe.get_config()
    for s in (c.shape, c.base_shape):
        s.update(width=32, expert_width=16, num_experts=4, top_k=2, depth=2)
    c.head_dim, c.seq_len, c.batch_size, c.steps = 8, 32, 8, STEPS
    c.compute_dtype = dtype
    return c


@functools.cache
def trained(dtype: str):
    """(final state, per-step losses) of `STEPS` steps on the embedded corpus."""
    program = train.setup(config(dtype))
    step = train.make_train_step(program)
    batches = data.Batches(data.load(program.config, program.config.data.train_split), 8, 0)
    state, losses = train.init_state(program), []
    for _ in range(STEPS):
        state, metrics = step(state, program.global_batch(next(batches)))
        losses.append(metrics["loss"])
    return state, np.asarray(jax.device_get(losses))


def test_bfloat16_training_follows_float32():
    want, got = trained("float32")[1], trained("bfloat16")[1]
    assert want[-10:].mean() < 0.6 * want[0]  # it learned: the comparison is not of two flat lines
    np.testing.assert_allclose(got, want, rtol=STEP_RTOL)
    assert abs(got[-10:].mean() - want[-10:].mean()) < TAIL_RTOL * want[-10:].mean()


def test_master_parameters_and_optimizer_state_stay_float32():
    state = trained("bfloat16")[0]
    floats = [x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and set(floats) == {jnp.dtype("float32")}


def scaled_config(dtype: str):
    """4x the base width (regime III), so the per-leaf LR and eps factors are not all 1."""
    c = config(dtype)
    c.shape.update(width=128, expert_width=64)
    return c


def model(c) -> nnx.Module:
    return factory.build_model(c, nnx.Rngs(0))


def test_matmuls_run_in_bfloat16_and_the_sensitive_parts_in_float32():
    m = model(config("bfloat16"))
    tokens = jnp.zeros((2, 32), jnp.int32)
    jaxpr = str(jax.make_jaxpr(lambda t: m(t))(tokens))
    assert "bf16[2,32,32]" in jaxpr and "dot_general" in jaxpr  # the projections' inputs
    logits, routings = m(tokens)
    assert logits.dtype == jnp.float32
    assert all(r.logits.dtype == r.weights.dtype == jnp.float32 for r in routings)


def test_per_leaf_lr_and_eps_do_not_depend_on_the_dtype():
    f32, bf16 = model(scaled_config("float32")), model(scaled_config("bfloat16"))
    scaling = factory.validate(scaled_config("float32"))
    flat = lambda tree: dict(nnx.to_flat_state(tree))  # noqa: E731
    for rule in (optim.lr_multipliers, optim.eps_multipliers):
        want = flat(rule(scaling, f32))
        assert flat(rule(scaling, bf16)) == want and len(set(want.values())) > 1
    mask = lambda m: flat(optim.decay_mask(nnx.state(m, nnx.Param)))  # noqa: E731
    assert mask(bf16) == mask(f32)


def test_unknown_compute_dtype_names_the_field_and_the_choices():
    with pytest.raises(ConfigError,
                       match=r"compute_dtype must be one of \['float32', 'bfloat16'\]"):
        factory.validate(config("float16"))
