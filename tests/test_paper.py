"""The paper form (`mssp_jax.paper`, ``constants='paper'``) and the reference behaviours it uses,
each against a hand computation. Number-for-number agreement with the reference's dumps is
tests/test_reference.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import mlp_moe
from configs.paper import mlp_moe as paper_mlp
from configs.paper import transformer_moe as paper_transformer
from experiments import sweep
from mssp_jax import describe, factory, losses, optim, paper
from mssp_jax.models import RMSNorm, TransformerMoE
from mssp_jax.moe import gelu, route
from mssp_jax.scaling import ConfigError, Shape, make_scaling


def test_constants_multiply_the_ratio_rules_at_every_shape():
    table = {"roles": {"router": {"std": "fan_in^-0.5", "adam_lr": "rN^-1", "adam_eps": "rM^-1",
                                  "const": {"lr": "N^-1", "eps": "M^-1", "std": "2"},
                                  "tuned": {"lr": 4.0, "mult": 0.5}}},
             "gate_alpha": 1, "gate_const": "K^-1"}
    base, shape = Shape(128, 16, 8, 2), Shape(512, 16, 32, 8)
    s = make_scaling(table, base, shape, optimizer="adam")
    assert s.lr_scale("router") == pytest.approx(4.0 / 512)  # 4 * (1/128) * (128/512)
    assert s.eps_scale("router") == pytest.approx(1.0 / 32)
    assert s.init_std("router", 512) == pytest.approx(2.0 / math.sqrt(512))
    assert s.multiplier("router") == pytest.approx(0.5)
    assert s.gate_scale == pytest.approx(1.0 / 8)  # (1/K0) * (K0/K)


@pytest.mark.parametrize("bad, message", [
    ({"const": {"lr": "N^-1*Q"}}, "unknown symbol 'Q'"),
    ({"const": {"speed": "1"}}, "unknown key 'speed'"),
    ({"tuned": {"lr": -2.0}}, "must be a positive number"),
    ({"tuned": {"lr": "4"}}, "must be a positive number"),
])
def test_bad_constants_name_the_field(bad, message):
    table = {"roles": {"router": {"std": "fan_in^-0.5", "adam_lr": "1", **bad}}}
    with pytest.raises(ConfigError, match=message) as err:
        make_scaling(table, Shape(8, 8, 4, 1), Shape(16, 16, 8, 2), optimizer="adam")
    assert "roles.router" in str(err.value)


def test_d_in_constant_needs_the_input_width():
    table = {"roles": {"input": {"std": "fan_in^-0.5", "adam_lr": "1", "const": {"lr": "d_in^-1"}}}}
    with pytest.raises(ConfigError, match="input_dim"):
        make_scaling(table, Shape(8, 8, 4, 1), Shape(16, 16, 8, 2), optimizer="adam")
    s = make_scaling(table, Shape(8, 8, 4, 1), Shape(16, 16, 8, 2), optimizer="adam", input_dim=40)
    assert s.lr_scale("input") == pytest.approx(1 / 40)


def test_paper_forms_carry_the_regime_changes_of_mssp():
    mssp_i = paper.table("mssp", "I", "adam")
    assert mssp_i["reference"] == "fixed_E_mup_adam" and mssp_i["roles"]["router"]["std"] == "zero"
    assert paper.table("mup", "I", "adam")["roles"]["router"]["std"] != "zero"
    mssp_iii = paper.table("mssp", "III", "sgd")
    assert (mssp_iii["shared_expert_init"]
            and not paper.table("mup", "III", "sgd")["shared_expert_init"])
    assert paper.table("mssp", "II", "adam", "transformer_moe")["reference"] == "MupBottleneck"
    # an SGD reference config has no Adam rule: using it with Adam is a clear error
    sgd_table = paper.table("mup", "II", "sgd")
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        make_scaling(sgd_table, Shape(128, 16, 8, 2), Shape(256, 16, 16, 4), optimizer="adam")
    with pytest.raises(ConfigError, match="no paper form"):
        paper.table("mssp", "II", "sgd", "transformer_moe")


def test_tuned_lookup_follows_the_reference():
    # not shared: '<routing>_no_shared' wins where it exists; shared: '<routing>'
    assert paper.mlp_tuned("mup_adam_allscaling_stdinit_ours", "topk", shared=False).lr_out == 4.0
    assert paper.mlp_tuned("mup_adam_allscaling_stdinit_ours", "topk", shared=True).lr_out == 16.0
    assert paper.mlp_tuned("fixed_E_sp", "topk", shared=False) is None
    t = paper.table("mssp", "II", "adam", routing="soft", tuned=True)
    assert t["roles"]["expert_down"]["tuned"] == {"lr": 0.00390625, "std": 0.25}
    tr = paper.table("mssp", "III", "adam", "transformer_moe", tuned=True)
    assert tr["roles"]["expert_down"]["tuned"] == {"lr": 128.0, "std": 4.0}
    assert tr["roles"]["embedding"]["tuned"] == {"lr": 16.0}


def test_constants_paper_config_resolves_the_paper_table():
    c = mlp_moe.get_config("regime=II,scale=2")
    ratio = factory.validate(c)
    c.constants = "paper"
    s = factory.validate(c)
    assert s.table["reference"] == "mup_bottleneck_adam_multfree"
    assert s.eps_scale("expert_down") == pytest.approx(1 / (128 * 16))  # 1/(N M) at N=128, M=16
    assert ratio.eps_scale("expert_down") == pytest.approx(1 / 4)  # ratio form: 1 at the base
    c.constants = "absolute"
    with pytest.raises(ConfigError, match="constants must be one of"):
        factory.validate(c)


def test_describe_reports_absolute_lr_and_eps():
    c = paper_mlp.get_config("regime=II")
    s = factory.validate(c)
    model = nnx.eval_shape(lambda: factory.build_model(c, nnx.Rngs(0), s))
    rows = {r["role"]: r for r in describe.describe(model, s, 0.16, 1e-8)}
    # MSSP II Adam at the base N=128: LR eta * (1/fan_in) * tuned, eps 1e-8 / (N M)
    assert rows["expert_down"]["lr"] == pytest.approx(0.16 / 16 * 0.00390625)
    assert rows["input"]["lr"] == pytest.approx(0.16 / 3072 * 4.0)
    assert rows["expert_down"]["eps"] == pytest.approx(1e-8 / (128 * 8))


# ---- reference behaviours, each against a hand computation -----------------------------------

def test_selected_gates_load_balance_by_hand():
    logits = np.array([[2.0, 0.0, 1.0, -1.0], [0.5, 3.0, -2.0, 1.0], [0.0, 0.1, 0.2, 0.3]],
                      np.float32)
    r = route(jnp.asarray(logits), 2, 0.5, load_balance="selected_gates")
    sig = 1 / (1 + np.exp(-logits))
    top = np.argsort(-logits, -1)[:, :2]
    gates, counts = np.zeros_like(logits), np.zeros(4)
    for t, experts in enumerate(top):
        gates[t, experts] = 0.5 * sig[t, experts]
        counts[experts] += 1
    want = 4 * np.sum(gates.mean(0) * counts / 3)  # tokens per expert sum to K = 2
    assert float(r.aux_loss) == pytest.approx(want, rel=1e-6)
    switch = route(jnp.asarray(logits), 2, 0.5)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert float(switch.aux_loss) == pytest.approx(4 * np.sum(probs.mean(0) * counts / 6), rel=1e-6)


def test_aux_loss_summed_or_averaged_over_layers():
    c = paper_transformer.get_config("family=allscale_sparse")
    c.update(c.quick_overrides)
    c.shape = c.base_shape
    model = factory.build_model(c, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 256)
    batch = {"inputs": tokens, "targets": tokens}
    _, routings = model(tokens)
    per_layer = [float(r.aux_loss) for r in routings]
    assert len(per_layer) == 2
    total, m = losses.loss_fn(model, batch, c)
    assert float(total) == pytest.approx(float(m["task_loss"]) + 0.01 * sum(per_layer), rel=1e-6)
    c.aux_loss_layers = "mean"
    total, m = losses.loss_fn(model, batch, c)
    assert float(total) == pytest.approx(float(m["task_loss"]) + 0.01 * np.mean(per_layer),
                                         rel=1e-6)


def test_mse_mean_over_classes_is_the_sum_over_classes_divided():
    out = jax.random.normal(jax.random.PRNGKey(1), (5, 10))
    y = jnp.arange(5)
    by_hand = np.mean(np.sum((np.asarray(out) - np.eye(10)[np.arange(5)]) ** 2, -1))
    assert float(losses.task_loss(out, y, "mse")) == pytest.approx(by_hand, rel=1e-6)
    assert float(losses.task_loss(out, y, "mse", "mean")) == pytest.approx(by_hand / 10, rel=1e-6)


def test_qk_norm_without_gain_has_no_parameter_and_is_plain_rms_normalisation():
    s = make_scaling("mssp", Shape(16, 8, 4, 2, 1), Shape(16, 8, 4, 2, 1), regime="III")
    norm = RMSNorm(8, s, "head_dim", rngs=nnx.Rngs(0), gain=False)
    assert not jax.tree.leaves(nnx.state(norm, nnx.Param))
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    want = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(norm(jnp.asarray(x)), want, rtol=1e-6)
    model = nnx.eval_shape(lambda: TransformerMoE(32, s, rngs=nnx.Rngs(0), head_dim=8,
                                                  qk_norm_gain=False))
    assert not any("q_norm" in r["path"] or "k_norm" in r["path"]
                   for r in describe.describe(model, s))


def test_exact_gelu_is_the_erf_form():
    x = np.linspace(-4, 4, 17)
    want = [v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x]
    np.testing.assert_allclose(gelu(True)(jnp.asarray(x, jnp.float32)), want, rtol=1e-6, atol=1e-7)
    assert float(jnp.max(jnp.abs(gelu(False)(jnp.asarray(x)) - jnp.asarray(want)))) > 1e-5


@pytest.mark.parametrize("decay_all", [False, True])
def test_decay_all_decays_norm_gains_too(decay_all):
    s = make_scaling("mssp", Shape(16, 8, 4, 2, 1), Shape(32, 16, 8, 4, 1), regime="III")
    model = TransformerMoE(32, s, rngs=nnx.Rngs(0), head_dim=8)
    labels = optim.role_labels(model)
    params = nnx.pure(nnx.state(model, nnx.Param))
    tx = optim.adamw(0.1, s, model, weight_decay=0.5, decay_all=decay_all)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    roles = set()
    for u, p, role in zip(jax.tree.leaves(updates), jax.tree.leaves(params),
                          jax.tree.leaves(labels)):
        decayed = decay_all or p.ndim >= 2  # lr * wd for every group, whatever its LR factor
        np.testing.assert_allclose(u, -0.1 * 0.5 * np.asarray(p) * decayed, rtol=1e-6, atol=1e-12)
        roles.add((role, decayed))
    assert ("norm", decay_all) in roles and ("norm", not decay_all) not in roles


def test_reference_warmup_starts_at_lr_over_w_plus_one():
    c = paper_transformer.get_config("family=allscale_sparse")
    c.steps, c.optimizer.warmup_steps, lr = 50, 10, c.optimizer.learning_rate
    schedule = factory.build_schedule(c)
    for it in range(50):
        if it < 10:
            want = lr * (it + 1) / 11
        else:
            want = lr / 10 + 0.5 * (1 + math.cos(math.pi * (it - 10) / 40)) * (lr - lr / 10)
        assert float(schedule(it)) == pytest.approx(want, rel=1e-5), it
    c.optimizer.warmup_start = "one"
    with pytest.raises(ConfigError, match="optimizer.warmup_start"):
        factory.build_schedule(c)


# ---- protocol configs: their quick variants run end to end ---------------------------------------

@pytest.mark.parametrize("config", [
    paper_mlp.get_config("regime=III,optimizer=sgd"),
    paper_transformer.get_config("family=efficient_bottleneck"),
])
def test_protocol_configs_quick_sweep(config, tmp_path):
    config.quick = True
    assert sweep.main(config, str(tmp_path)) == 0
    records = sweep.finished(config, str(tmp_path))
    assert len(records) == 2 * len(sweep.prepare(config).sweep.parameterizations)
    assert all(r["runs"] for r in records)


def test_protocol_config_arguments_are_checked():
    with pytest.raises(ConfigError, match=r"regime must be one of \['II', 'I', 'III'\], got 'IV'"):
        paper_mlp.get_config("regime=IV")
    with pytest.raises(ConfigError, match="unknown name 'width'; allowed names"):
        paper_transformer.get_config("width=3")
    full = paper_mlp.get_config("regime=II")
    assert (full.steps, full.batch_size, full.sweep.scales) == (1000, 50, (1, 2, 4, 8, 16))
    assert len(full.sweep.seeds) == 4
    assert full.sweep.lr_grids["adam"][1] / full.sweep.lr_grids["adam"][0] == pytest.approx(10**0.5)
    assert full.sweep.lr_grids["sgd"][1] / full.sweep.lr_grids["sgd"][0] == pytest.approx(2.0)
    tr = paper_transformer.get_config("family=allscale_sparse,scale=8")
    s = factory.validate(tr)
    assert (s.shape.N, s.shape.M, s.shape.K, s.shape.Ne, s.shape.L) == (2048, 64, 32, 1024, 8)
    assert (tr.seq_len, tr.batch_size, tr.steps) == (1024, 512, 4768)


def test_tuned_fields_train_as_the_vmapped_multipliers():
    """A multiplier sweep's best point written into `tuned` trains exactly as the same point
    applied by the vmapped multiplier path (std x init factor, update x LR factor)."""
    from configs import sweeps_mlp_moe
    from experiments import tasks
    from mssp_jax import vmap_train

    c = sweep.prepare(sweeps_mlp_moe.get_config("regime=II"))
    c.quick = False
    c.update(dict(steps=3, batch_size=4, eval_size=8))
    c.shape = c.base_shape
    data = tasks.load(c)
    point = {"init": {"expert_down": 0.25}, "lr": {"router": 4.0, "input": 0.5}}
    vmapped = vmap_train.train_lrs(c, [1e-2], [0], data, [point])
    c.tuned = sweep.as_tuned(point)
    assert c.tuned.to_dict() == {"expert_down": {"std": 0.25}, "router": {"lr": 4.0},
                                 "input": {"lr": 0.5}}
    written = vmap_train.train_lrs(c, [1e-2], [0], data)
    np.testing.assert_allclose(written.train_loss, vmapped.train_loss, rtol=1e-5)
    np.testing.assert_allclose(written.eval_loss, vmapped.eval_loss, rtol=1e-5)
    c.tuned = {}
    plain = vmap_train.train_lrs(c, [1e-2], [0], data)
    assert not np.allclose(plain.train_loss, written.train_loss)


def test_chunked_runs_equal_one_program():
    """`max_runs` splits the LR grid into chunks of one compiled program: same numbers."""
    from configs import sweeps_mlp_moe
    from experiments import tasks
    from mssp_jax import vmap_train

    c = sweep.prepare(sweeps_mlp_moe.get_config("regime=III"))
    c.quick = False
    c.update(dict(steps=3, batch_size=4, eval_size=8))
    c.shape = c.base_shape
    data = tasks.load(c)
    lrs = [1e-3, 3e-3, 1e-2]
    whole = vmap_train.train_lrs(c, lrs, [0, 1], data)
    chunked = vmap_train.train_lrs(c, lrs, [0, 1], data, max_runs=4)  # 2 LRs a chunk, 1 padded
    np.testing.assert_allclose(chunked.train_loss, whole.train_loss, rtol=1e-6)
    np.testing.assert_allclose(chunked.eval_loss, whole.eval_loss, rtol=1e-6)
    assert chunked.train_loss.shape == (3, 2, 3)


@pytest.mark.parametrize("lrs, seeds, max_runs, chunk", [
    (2, 4, 32, 2), (7, 4, 32, 7), (8, 4, 32, 8), (10, 4, 32, 5), (3, 2, 4, 2), (5, 1, 0, 5),
    (3, 8, 4, 1)])
def test_lr_chunks_are_even_and_pad_less_than_one_lr_each(lrs, seeds, max_runs, chunk):
    from mssp_jax import vmap_train

    assert vmap_train.lr_chunk(lrs, seeds, max_runs) == chunk
