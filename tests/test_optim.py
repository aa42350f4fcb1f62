"""The Optax chain: equals a hand-written per-group update, composes with user chains, refuses
unlabelled parameters; labels survive jit, grad, split/merge and an orbax round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from mssp_jax import optim
from mssp_jax.models import MLPMoE
from mssp_jax.params import role_labels
from mssp_jax.scaling import Shape, make_scaling

BASE, SHAPE = Shape(16, 8, 4, 2), Shape(64, 8, 16, 8)  # regime II, rN = rM = 4


def setup(optimizer: str):
    scaling = make_scaling("mssp", BASE, SHAPE, regime="II", optimizer=optimizer)
    model = MLPMoE(12, 3, scaling, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (32, 12))
    y = jax.random.normal(jax.random.key(2), (32, 3))
    return scaling, model, x, y


def grads_of(model, x, y):
    def loss(m):
        return jnp.mean((m(x)[0] - y) ** 2)
    return nnx.grad(loss)(model)


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(
                nnx.to_pure_dict(tree) if hasattr(tree, "flat_state") else tree)[0]}


def param_arrays(model):
    return flat(nnx.state(model, nnx.Param))


def roles_flat(model):
    return flat(role_labels(model))


def test_adamw_step_equals_hand_written_per_group_update():
    scaling, model, x, y = setup("adam")
    lr, wd, eps, b1, b2 = 1e-2, 0.1, 1e-3, 0.9, 0.95
    before, roles = param_arrays(model), roles_flat(model)
    grads = flat(nnx.state(grads_of(model, x, y), nnx.Param))
    opt = nnx.Optimizer(model, optim.adamw(lr, scaling, model, b1=b1, b2=b2, eps=eps,
                                           weight_decay=wd), wrt=nnx.Param)
    opt.update(model, grads_of(model, x, y))
    after = param_arrays(model)
    for key, p in before.items():
        g, role = grads[key], str(roles[key])
        m, v = (1 - b1) * g, (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1), v / (1 - b2)
        adam = m_hat / (np.sqrt(v_hat) + eps * scaling.eps_scale(role))
        decay = wd * p if p.ndim >= 2 else 0.0
        expected = p - lr * (scaling.lr_scale(role) * adam + decay)  # decay lr*wd for every group
        np.testing.assert_allclose(after[key], expected, rtol=2e-5, atol=1e-7,
                                   err_msg=f"{key} ({role})")
    # the test is only meaningful if the groups really differ
    assert len({scaling.lr_scale(str(r)) for r in roles.values()}) > 1
    assert len({scaling.eps_scale(str(r)) for r in roles.values()}) > 1


def test_sgd_step_equals_hand_written_per_group_update():
    scaling, model, x, y = setup("sgd")
    lr = 0.05
    before, roles = param_arrays(model), roles_flat(model)
    grads = flat(nnx.state(grads_of(model, x, y), nnx.Param))
    opt = nnx.Optimizer(model, optim.sgd(lr, scaling, model), wrt=nnx.Param)
    opt.update(model, grads_of(model, x, y))
    after = param_arrays(model)
    for key, p in before.items():
        expected = p - lr * scaling.lr_scale(str(roles[key])) * grads[key]
        np.testing.assert_allclose(after[key], expected, rtol=1e-5, atol=1e-7, err_msg=key)
    assert scaling.lr_scale("expert_down") == 16.0  # rM * rN / rNe


def test_composes_with_user_chain_schedule_and_inject_hyperparams():
    scaling, model, x, y = setup("adam")
    schedule = optax.linear_schedule(1e-2, 0.0, 10)
    tx = optax.chain(optax.clip_by_global_norm(1e-3), optim.adamw(schedule, scaling, model))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = param_arrays(model)
    opt.update(model, grads_of(model, x, y))
    moved = {k: np.abs(param_arrays(model)[k] - v).max() for k, v in before.items()}
    assert max(moved.values()) > 0

    injected = optax.inject_hyperparams(optim.adamw, static_args=("scaling", "params"))(
        learning_rate=1e-2, scaling=scaling, params=model)
    opt2 = nnx.Optimizer(model, injected, wrt=nnx.Param)
    opt2.opt_state.hyperparams["learning_rate"][...] = jnp.asarray(0.0)
    before = param_arrays(model)
    opt2.update(model, grads_of(model, x, y))
    for k, v in param_arrays(model).items():
        np.testing.assert_array_equal(v, before[k])  # LR injected as 0 => no change


def test_pure_dict_params_with_label_tree():
    scaling, model, x, y = setup("adam")
    params = nnx.state(model, nnx.Param).to_pure_dict()
    labels = role_labels(model).to_pure_dict()
    tx = optim.adamw(1e-2, scaling, labels)
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    # first Adam step with unit grads moves every leaf by lr * lr_scale(role) (eps negligible)
    for key, u in flat(updates).items():
        role = str(flat(labels)[key])
        np.testing.assert_allclose(u, -1e-2 * scaling.lr_scale(role), rtol=1e-4)


def test_unlabelled_parameter_is_an_error():
    scaling, model, _, _ = setup("adam")
    model.extra = nnx.Param(jnp.zeros((3,)))
    with pytest.raises(ValueError,
                       match=r"(?s)without a known role label.*\[.extra.\] \(role=None\)"):
        optim.adamw(1e-2, scaling, model)


def test_labels_survive_jit_grad_split_merge_and_orbax(tmp_path):
    scaling, model, x, y = setup("adam")
    roles = roles_flat(model)

    @nnx.jit
    def identity(m):
        return m

    assert roles_flat(identity(model)) == roles
    grads = grads_of(model, x, y)
    assert flat(role_labels(grads)) == roles
    graphdef, state = nnx.split(model)
    assert roles_flat(nnx.merge(graphdef, state)) == roles

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", nnx.state(model, nnx.Param))
    checkpointer.wait_until_finished()
    abstract = nnx.eval_shape(lambda: MLPMoE(12, 3, scaling, rngs=nnx.Rngs(7)))
    gdef, abstract_state = nnx.split(abstract, nnx.Param)
    restored = checkpointer.restore(tmp_path / "ckpt", abstract_state)
    merged = nnx.merge(gdef, restored)
    assert roles_flat(merged) == roles
    for k, v in param_arrays(merged).items():
        np.testing.assert_array_equal(v, param_arrays(model)[k])
