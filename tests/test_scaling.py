"""Every preset x regime x optimizer: each leaf's init std, multiplier, LR and eps factors equal the
spec's formulas at several scales, for both models; the sampled inits have the stated std."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mssp_jax import describe as describe_lib
from mssp_jax import presets
from mssp_jax.models import MLPMoE, TransformerMoE
from mssp_jax.scaling import ConfigError, Shape, make_scaling, parse_monomial, RATIO_SYMBOLS
from tests import spec_formulas as spec

BASE = {"I": Shape(32, 32, 4, 2, 2), "II": Shape(32, 8, 4, 2, 2), "III": Shape(32, 32, 4, 2, 2)}
SCALES = (1, 2, 4)


def scaled(regime: str, k: int) -> Shape:
    b = BASE[regime]
    grow_ne, grow_m = regime in ("I", "III"), regime in ("II", "III")
    return Shape(b.N * k, b.Ne * k if grow_ne else b.Ne, b.M * k if grow_m else b.M,
                 b.K * k if grow_m else b.K, b.L)


def cases():
    for preset, regime, optimizer in itertools.product(presets.PRESETS, presets.REGIMES,
                                                       presets.OPTIMIZERS):
        if preset == "jiang" and optimizer == "sgd":
            continue
        yield preset, regime, optimizer


def abstract_models(scaling):
    mlp = nnx.eval_shape(lambda: MLPMoE(48, 10, scaling, rngs=nnx.Rngs(0)))
    lm = nnx.eval_shape(lambda: TransformerMoE(64, scaling, rngs=nnx.Rngs(0), head_dim=16,
                                               moe_every=2))
    return mlp, lm


@pytest.mark.parametrize("preset,regime,optimizer", list(cases()))
def test_every_leaf_matches_spec(preset, regime, optimizer):
    for k in SCALES:
        shape = scaled(regime, k)
        scaling = make_scaling(preset, BASE[regime], shape, regime=regime, optimizer=optimizer,
                               depth="none")
        ratios = scaling.ratios
        for model in abstract_models(scaling):
            rows = describe_lib.describe(model, scaling)
            assert rows, "no parameters described"
            for row in rows:
                role, where = row["role"], f"{preset}/{regime}/{optimizer} x{k} {row['path']}"
                np.testing.assert_allclose(row["init_std"],
                                           spec.std(preset, regime, role, shape, row["fan_in"]),
                                           rtol=1e-6, err_msg=where)
                np.testing.assert_allclose(row["lr_scale"],
                                           spec.lr(preset, optimizer, role, ratios),
                                           rtol=1e-6, err_msg=where)
                np.testing.assert_allclose(row["eps_scale"],
                                           spec.eps(preset, optimizer, role, ratios),
                                           rtol=1e-6, err_msg=where)
                assert row["multiplier"] == 1.0, where
                shared = row["init"] == "shared_normal"
                assert shared == (spec.shared_experts(preset, regime)
                                  and role.startswith("expert_")), where


def test_lr_and_eps_are_one_at_base_shape():
    for preset, regime, optimizer in cases():
        s = make_scaling(preset, BASE[regime], BASE[regime], regime=regime, optimizer=optimizer)
        for role in presets.ROLES:
            assert (s.lr_scale(role) == 1.0 and s.eps_scale(role) == 1.0
                    and s.multiplier(role) == 1.0)


@pytest.mark.parametrize("preset,regime",
                         [("mup", "II"), ("mssp", "II"), ("mssp", "III"), ("sp", "I")])
def test_sampled_init_std_matches_rule(preset, regime):
    shape = scaled(regime, 2)
    scaling = make_scaling(preset, BASE[regime], shape, regime=regime, optimizer="adam")
    model = MLPMoE(48, 10, scaling, rngs=nnx.Rngs(1))
    rows = {r["path"]: r for r in describe_lib.describe(model, scaling)}
    for path, var in jax.tree_util.tree_flatten_with_path(
            nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        key = "/".join(str(p.key) for p in path)
        value = np.asarray(var[...])
        if rows[key]["init"] == "shared_normal":
            assert np.all(value == value[:1]), f"{key}: experts differ under shared init"
            value = value[:1]
        n = value.size
        # The std of n iid normals has relative sampling error ~ 1/sqrt(2n); allow 5 sigma.
        np.testing.assert_allclose(value.std(), rows[key]["init_std"],
                                   rtol=5 / np.sqrt(2 * n) + 1e-7, atol=0 if value.std() else 1e-12,
                                   err_msg=key)


def test_depth_rules():
    base, deep = Shape(32, 8, 4, 2, 2), Shape(32, 8, 4, 2, 8)
    s = make_scaling("mup", base, deep, regime="II", optimizer="adam", depth="depth_mup")
    assert s.multiplier("attn_out") == s.multiplier("expert_down") == 0.5  # rL^-1/2, rL = 4
    assert s.multiplier("attn_qkv") == 1.0 and s.lr_scale("attn_qkv") == 0.5
    assert s.lr_scale("embedding") == 1.0
    c = make_scaling("mup", base, deep, regime="II", optimizer="adam", depth="completep")
    assert c.multiplier("mlp_down") == 0.25 and c.lr_scale("expert_up") == 1.0
    assert c.eps_scale("router") == 0.25 and c.eps_scale("readout") == 1.0
    sgd = make_scaling("mup", base, deep, regime="II", optimizer="sgd", depth="depth_mup")
    assert sgd.lr_scale("attn_qkv") == 1.0
    assert make_scaling("jiang", base, deep, regime="II").depth == "completep"


def test_monomial_parsing():
    m = parse_monomial("rM*rN/rNe", RATIO_SYMBOLS)
    assert m({"rM": 2, "rN": 4, "rNe": 8}) == 1.0
    assert float(m.exponent("rNe")) == -1.0
    assert parse_monomial("N^(-1/2)", ("N",))({"N": 16}) == 0.25
    assert parse_monomial("fan_in^-0.5*M^0.5", ("fan_in", "M"))({"fan_in": 16, "M": 4}) == 0.5
    assert parse_monomial("0.02", ())({}) == 0.02
    with pytest.raises(ConfigError, match="unknown symbol 'N'"):
        parse_monomial("N^-1", RATIO_SYMBOLS, "lr")
    with pytest.raises(ConfigError, match="cannot parse"):
        parse_monomial("rN**2", RATIO_SYMBOLS)


def test_regime_inference_and_gate_scale():
    b = BASE["II"]
    assert make_scaling("mssp", b, Shape(64, 8, 8, 4, 2)).regime == "II"
    assert make_scaling("mssp", b, Shape(64, 16, 4, 2, 2)).regime == "I"
    assert make_scaling("mssp", b, Shape(64, 16, 8, 4, 2)).regime == "III"
    assert make_scaling("mssp", b, Shape(64, 8, 8, 4, 2)).gate_scale == 0.5  # (K0/K)^1
    assert make_scaling("mssp", b, Shape(64, 16, 4, 2, 2)).gate_scale == 1.0  # alpha = 0 in I


def test_custom_table_is_a_plain_dict():
    table = {
        "name": "half_router_lr",
        "gate_alpha": 1,
        "roles": {**presets.MSSP["roles"], "router": {**presets.MSSP["roles"]["router"],
                                                     "adam_lr": "rN^-1*rM^-1"}},
    }
    s = make_scaling(table, BASE["II"], scaled("II", 4), regime="II")
    assert s.name == "half_router_lr" and s.lr_scale("router") == 1 / 16
    assert s.init_std("expert_down", 8) == pytest.approx((16 / 8) ** 0.5)
    with pytest.raises(ConfigError, match="unknown role 'routr'.*allowed"):
        make_scaling({"roles": {"routr": {"std": "1"}}}, BASE["II"], BASE["II"], regime="II")
    with pytest.raises(ConfigError, match="unknown key 'lr'"):
        make_scaling({"roles": {"router": {"lr": "1"}}}, BASE["II"], BASE["II"], regime="II")


@pytest.mark.parametrize("kwargs,match", [
    (dict(parameterization="mspp"), r"parameterization must be one of \['sp', 'mup', 'mssp'"),
    (dict(shape=Shape(32, 8, 4, 5, 2)), r"K \(top_k=5\) must be <= M \(num_experts=4\)"),
    (dict(shape=Shape(64, 8, 8, 2, 2)), r"sparsity K/M fixed"),
    (dict(shape=Shape(64, 16, 8, 4, 2), regime="I"), r"regime I keeps num_experts fixed"),
    (dict(shape=Shape(64, 16, 8, 4, 2), regime="II"), r"regime II keeps expert_width fixed"),
    (dict(regime="IV"), r"regime must be one of \['I', 'II', 'III'\]"),
    (dict(regime="auto"), r"cannot be inferred; set regime"),
    (dict(optimizer="lion"), r"optimizer must be one of \['sgd', 'adam'\]"),
    (dict(parameterization="jiang", optimizer="sgd"), r"optimizer must be one of \['adam'\]"),
    (dict(depth="deep"), r"depth_scaling must be one of"),
])
def test_bad_input_errors(kwargs, match):
    args = dict(parameterization="mssp", base=BASE["II"], shape=BASE["II"], regime="II",
                optimizer="adam", depth="")
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        make_scaling(args.pop("parameterization"), args.pop("base"), args.pop("shape"), **args)


def test_transformer_width_must_divide_heads():
    s = make_scaling("mssp", BASE["II"], BASE["II"], regime="II")
    with pytest.raises(ConfigError, match=r"width \(N=32\) must be divisible by head_dim \(12\)"):
        TransformerMoE(64, s, rngs=nnx.Rngs(0), head_dim=12)


def test_zero_router_ties_do_not_all_go_to_expert_zero():
    s = make_scaling("mssp", BASE["I"], scaled("I", 2), regime="I")
    model = MLPMoE(48, 10, s, rngs=nnx.Rngs(0))
    assert not np.any(np.asarray(model.moe.router[...]))
    _, (routing,) = model(jax.random.normal(jax.random.key(0), (64, 48)))
    load = np.asarray(routing.load)
    # exact ties: rotated evenly
    np.testing.assert_allclose(load, np.full_like(load, 1 / load.size))
    assert jnp.allclose(routing.weights, 0.5 * s.gate_scale)  # sigmoid(0) x gate scale
