"""Coordinate checks from the layers' own records (mssp_jax/coord.py): exact arithmetic of the
observables, no cost when not capturing, stacked (scanned) layers, per-seed exponents, and equality
with the hand-written MLP-MoE forward the coordinate check used before."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import sweeps_coord_check
from experiments import coord_check, sweep, tasks
from mssp_jax import coord, factory, losses
from mssp_jax.models import Linear, MLPMoE, TransformerMoE
from mssp_jax.moe import MoE
from mssp_jax.scaling import Shape, make_scaling
from tests import mlp_coord_oracle as oracle

BASE = Shape(8, 8, 4, 1)
SCALING = make_scaling("mup", BASE, Shape(16, 16, 8, 2), regime="III")


def rms(a):
    return np.sqrt(np.mean(np.square(np.asarray(a, np.float64))))


def observe(model: nnx.Module, pt_of, x: jax.Array, outputs: bool = False) -> dict:
    """Observables of `model` (W_0) against its Params mapped by `pt_of` (W_t), on probe `x`."""
    graphdef, p0, rest = nnx.split(model, nnx.Param, ...)
    pt = jax.tree.map(pt_of, p0)
    loss = lambda m, x: jnp.sum(jnp.square(jax.tree.leaves(m(x))[0]))  # noqa: E731

    def captured(p):
        return coord.capture(loss, nnx.merge(graphdef, p, rest), x, outputs=outputs)

    @jax.jit
    def observables(p0, pt):
        (_, capt), grads = jax.value_and_grad(captured, has_aux=True)(pt)
        return coord.observables(graphdef, rest, p0, pt, grads, captured(p0)[1], capt), grads

    obs, grads = observables(p0, pt)
    return {k: float(v) for k, v in obs.items()}, p0, pt, grads


class TwoLinear(nnx.Module):
    """y = B tanh(A x), both with role attn_qkv (so their role pools them)."""

    def __init__(self, rngs: nnx.Rngs):
        self.a = Linear(3, 5, "attn_qkv", ("embed", "heads"), SCALING, rngs=rngs)
        self.b = Linear(5, 2, "attn_qkv", ("heads", "embed"), SCALING, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


def test_kernel_observables_are_the_updates_of_each_linear_map():
    model = TwoLinear(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 3))
    obs, p0, pt, grads = observe(model, lambda w: w * 1.5 + 0.1, x)
    a0, at, b0, bt = (np.asarray(p[k]["kernel"][...], np.float64)
                      for k in ("a", "b") for p in (p0, pt))
    x = np.asarray(x, np.float64)
    h0, ht = np.tanh(x @ a0), np.tanh(x @ at)
    assert obs["a/kernel/activation"] == pytest.approx(rms(x @ at), rel=1e-5)
    assert obs["a/kernel/effective_update"] == pytest.approx(rms(x @ (at - a0)), rel=1e-5)
    assert obs["a/kernel/propagating_update"] == 0.0  # the data do not move
    assert obs["b/kernel/activation"] == pytest.approx(rms(ht @ bt), rel=1e-5)
    assert obs["b/kernel/effective_update"] == pytest.approx(rms(ht @ (bt - b0)), rel=1e-5)
    assert obs["b/kernel/propagating_update"] == pytest.approx(rms((ht - h0) @ b0), rel=1e-5)
    assert obs["b/kernel/weight_change"] == pytest.approx(rms(bt - b0), rel=1e-5)
    assert obs["b/kernel/grad"] == pytest.approx(rms(grads["b"]["kernel"][...]), rel=1e-5)
    # one role, two layers: pooled by the quadratic mean
    pooled = np.sqrt((obs["a/kernel/activation"] ** 2 + obs["b/kernel/activation"] ** 2) / 2)
    assert obs["attn_qkv/activation"] == pytest.approx(pooled, rel=1e-6)


def test_module_outputs_and_their_change():
    model = TwoLinear(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 3))
    obs, p0, pt, _ = observe(model, lambda w: 2.0 * w, x, outputs=True)
    y0, yt = (np.asarray(nnx.merge(nnx.graphdef(model), p)(x)) for p in (p0, pt))
    assert obs["output"] == pytest.approx(rms(yt), rel=1e-5)  # the model's own __call__
    assert obs["output_change"] == pytest.approx(rms(yt - y0), rel=1e-5)
    assert obs["b/output"] == pytest.approx(obs["b/kernel/activation"], rel=1e-6)
    assert "Linear/output" in obs and not any("coord_" in k for k in obs)


@pytest.mark.parametrize("stacked_metadata", [True, False])
def test_scanned_layers_come_back_per_layer(stacked_metadata):
    """Blocks stacked by nnx.vmap and run by nnx.scan give the observables of the same blocks
    run one by one, indexed by layer."""

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.lin = Linear(8, 8, "attn_out", ("heads", "embed"), SCALING, rngs=rngs)
            self.moe = MoE(8, 4, 4, 2, SCALING, rngs=rngs)

        def __call__(self, x):
            return x + self.moe(jnp.tanh(self.lin(x)))[0]

    metadata = {nnx.PARTITION_NAME: "layers"} if stacked_metadata else {}

    class Scanned(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=2)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=metadata)
            def make(rngs):
                return Block(rngs)

            self.blocks = make(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=metadata)
            def body(x, block):
                return block(x)

            return body(x, self.blocks)

    class Unrolled(nnx.Module):
        def __init__(self, scanned):
            stacked = nnx.as_pure(nnx.state(scanned.blocks, nnx.Param))
            self.blocks = nnx.List([Block(nnx.Rngs(0)) for _ in range(2)])
            for i, block in enumerate(self.blocks):
                nnx.update(block, jax.tree.map(lambda a, i=i: a[i], stacked))

        def __call__(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    scanned = Scanned(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (6, 8))
    move = lambda w: w * 1.1 + 0.01  # noqa: E731
    got, *_ = observe(scanned, move, x)
    want, *_ = observe(Unrolled(scanned), move, x)
    assert len(got) == len(want) > 40
    for key, value in want.items():
        stacked_key = re.sub(r"^blocks/(\d+)", r"blocks[\1]", key)
        assert got[stacked_key] == pytest.approx(value, rel=2e-4, abs=1e-7), key


def test_scanned_transformer_gives_the_unrolled_observables_per_layer():
    """`TransformerMoE(scan_layers=True)` (MoE every 2nd block): block j of group g reports what
    unrolled block 2g + j reports, and the per-role pools and the residual stream agree."""
    scaling = make_scaling("mssp", Shape(8, 8, 4, 2, 4), Shape(16, 8, 4, 2, 4), regime="III")
    scanned, unrolled = (TransformerMoE(32, scaling, head_dim=8, moe_every=2, scan_layers=scan,
                                        rngs=nnx.Rngs(0)) for scan in (True, False))
    stacked = nnx.to_flat_state(nnx.state(scanned, nnx.Param))
    blocks = dict(nnx.to_flat_state(nnx.state(unrolled, nnx.Param)))
    nnx.update(scanned, nnx.from_flat_state({
        path: jnp.stack([blocks[("blocks", 2 * g + int(path[2]), *path[3:])] for g in range(2)])
        if path[0] == "groups" else blocks[path] for path, _ in stacked}))
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, 32)
    move = lambda w: w * 1.1 + 0.01  # noqa: E731
    got, *_ = observe(scanned, move, tokens, outputs=True)
    want, *_ = observe(unrolled, move, tokens, outputs=True)
    renamed = lambda k: re.sub(r"^blocks/(\d+)",  # noqa: E731
                               lambda m: f"groups[{int(m[1]) // 2}]/blocks/{int(m[1]) % 2}", k)
    assert "residual/top" in want and "blocks/1/ffn/h_agg/base" in want
    assert {renamed(k) for k in want} <= set(got)
    for key, value in want.items():
        assert got[renamed(key)] == pytest.approx(value, rel=2e-4, abs=1e-7), key


def test_recording_traces_nothing_outside_capture(monkeypatch):
    """The normal forward and backward are the same program as with the record calls deleted."""
    mlp = MLPMoE(8, 3, SCALING, rngs=nnx.Rngs(0))
    shape = Shape(16, 16, 8, 2, 2)
    lm = TransformerMoE(64, make_scaling("mssp", Shape(8, 8, 4, 1, 2), shape, regime="III"),
                        head_dim=8, rngs=nnx.Rngs(0))

    def programs():
        out = []
        for model, x in ((mlp, jnp.ones((5, 8))), (lm, jnp.ones((2, 8), jnp.int32))):
            graphdef, state = nnx.split(model)
            loss = lambda s, x, g=graphdef: jnp.sum(nnx.merge(g, s)(x)[0])  # noqa: E731
            out.append(str(jax.make_jaxpr(jax.value_and_grad(loss))(state, x)))
        return out

    with_records = programs()
    monkeypatch.setattr(coord, "record", lambda *args, **kwargs: None)
    assert programs() == with_records


def test_fit_exponent_recovers_power_laws():
    ratios = [1, 2, 4, 8]
    for exponent in (-1.0, -0.5, 0.0, 0.5, 2.0):
        values = [3.7 * r**exponent for r in ratios]
        assert coord.fit_exponent(ratios, values) == pytest.approx(exponent, abs=1e-9)
    assert np.isnan(coord.fit_exponent(ratios, [1.0, 0.0, 1.0, 1.0]))


def test_exponents_are_fitted_per_seed():
    scales = [1, 2, 4, 8]
    slopes = [-0.5, -0.4, -0.6]
    per_seed = [[(1.0 + s) * r**a for s, a in enumerate(slopes)] for r in scales]
    stats = coord.exponent_stats(scales, per_seed)
    np.testing.assert_allclose(stats["exponents"], slopes, atol=1e-9)
    assert stats["exponent"] == pytest.approx(-0.5)
    assert stats["exponent_std"] == pytest.approx(0.1)  # sample std of -0.5, -0.4, -0.6
    per_seed[0][1] = 0.0  # a value exactly 0 has no logarithm: that seed's fit is undefined
    assert np.isnan(coord.exponent_stats(scales, per_seed)["exponent"])


def quick_cell(parameterization: str = "mup", **fields):
    config = sweeps_coord_check.get_config("regime=III")
    config.quick = True
    config = sweep.prepare(config)
    config.update(fields)
    return sweep.cell_config(config, sweep.Cell("coord", "III", "adam", parameterization, 2))


def test_the_oracle_is_the_mlp_moe_forward():
    config = quick_cell()
    scaling = factory.validate(config)
    model = factory.build_model(config, nnx.Rngs(0), scaling)
    x = jnp.asarray(tasks.load(config)["eval"]["inputs"])
    terms = oracle.forward_terms(nnx.as_pure(nnx.state(model, nnx.Param)), x, scaling,
                                 scaling.shape.K, False)
    np.testing.assert_allclose(terms["out"], model(x)[0], rtol=1e-5, atol=1e-6)


def test_mlp_moe_coord_check_equals_the_hand_written_forward():
    """The generic capture reproduces the coordinate check's former implementation (a hand-written
    forward pass, kept as the oracle): same training, every observable it reported."""
    record = (0, 1, 3)
    c = quick_cell(steps=4)
    c.coord.record_steps = record
    data = tasks.load(c)
    old = oracle.measure(c, data, (0, 1))
    new = coord_check.measure(c, data, "mup", 2)
    assert sorted(new) == sorted(old) == list(record)
    for step in record:
        assert len(old[step]) == 35
        for name, value in old[step].items():
            assert np.mean(new[step][name]) == pytest.approx(value, rel=1e-4, abs=1e-7), name
    assert old[3]["h_agg/effective"] > 0 and old[3]["expert_down/effective_update"] > 0
