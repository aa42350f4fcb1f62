"""Scanned layers (``scan_layers``): the same function, labels and optimizer as the unrolled model.

The scanned model's parameters are the unrolled model's, stacked group by group: block j of group
g is unrolled block g * moe_every + j. Tolerance: the scan changes only how XLA fuses and orders
float32 ops. Measured: the loss equal to the bit, gradients within 7.5e-8 absolute (entries up to
~1e-1). We allow 1e-6 relative on the loss and 1e-5 relative + 5e-7 absolute on gradients. The
groups applied in reverse order move the loss of these near-initial models by 3e-5 to 4e-4
relative, 30x or more above its tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import transformer_moe
from mssp_jax import describe, factory, losses, optim, sharding
from mssp_jax.scaling import ConfigError

LOSS_RTOL, RTOL, ATOL = 1e-6, 1e-5, 5e-7


def config(moe_every: int, scan: bool, remat: str = "none", depth: int = 4):
    c = transformer_moe.get_config()
    for s in (c.shape, c.base_shape):
        s.update(width=16, expert_width=8, num_experts=4, top_k=2, depth=depth)
    c.shape.update(width=32, expert_width=16)  # off the base shape: multipliers differ from 1
    c.head_dim, c.seq_len, c.batch_size = 8, 8, 2
    c.moe_every, c.scan_layers, c.remat = moe_every, scan, remat
    return c


def flat(tree) -> dict:
    return dict(nnx.to_flat_state(tree))


def as_unrolled(path: tuple, group: int, moe_every: int) -> tuple:
    """The unrolled path of group `group`'s slice of the scanned parameter at `path`."""
    if path[0] != "groups":
        return path
    return ("blocks", group * moe_every + int(path[2]), *path[3:])


def stacked_from(unrolled: dict, scanned: dict, moe_every: int) -> dict:
    """`scanned`'s flat params filled with the `unrolled` values, stacked group by group."""
    out = {}
    for path, value in scanned.items():
        groups = value.shape[0] if path[0] == "groups" else 1
        parts = [unrolled[as_unrolled(path, g, moe_every)] for g in range(groups)]
        out[path] = jnp.stack(parts) if path[0] == "groups" else parts[0]
    return out


def loss_and_grads(c, params):
    model = factory.build_model(c, nnx.Rngs(0))
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, c.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

    def loss(p):
        return losses.loss_fn(nnx.merge(graphdef, p, rest), batch, c)

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, metrics, flat(grads)


def pure_params(c) -> nnx.State:
    return nnx.as_pure(nnx.state(factory.build_model(c, nnx.Rngs(0)), nnx.Param))


@pytest.mark.parametrize("moe_every, remat", [(1, "none"), (2, "none"), (2, "full"),
                                              (1, "dots_saveable")])
def test_scanned_model_equals_the_unrolled_model(moe_every, remat):
    unrolled_c, scanned_c = config(moe_every, False), config(moe_every, True, remat)
    unrolled = pure_params(unrolled_c)
    scanned = pure_params(scanned_c)
    stacked = stacked_from(flat(unrolled), flat(scanned), moe_every)
    scanned = nnx.from_flat_state(stacked)
    want, want_metrics, want_grads = loss_and_grads(unrolled_c, unrolled)
    got, got_metrics, got_grads = loss_and_grads(scanned_c, scanned)
    np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)
    for name, value in want_metrics.items():
        np.testing.assert_allclose(got_metrics[name], value, rtol=RTOL, err_msg=name)
    np.testing.assert_allclose(want_metrics["aux_loss_sum"],
                               4 / moe_every * want_metrics["aux_loss"],
                               rtol=RTOL)  # every MoE layer's routing reached the metrics
    for path, grad in stacked_from(want_grads, got_grads, moe_every).items():
        np.testing.assert_allclose(got_grads[path], grad, rtol=RTOL, atol=ATOL, err_msg=str(path))


def test_labels_describe_optimizer_and_sharding_treat_stacked_layers_as_a_batch_axis():
    moe_every = 2
    unrolled_c, scanned_c = config(moe_every, False), config(moe_every, True)
    models = {k: factory.build_model(c, nnx.Rngs(0)) for k, c in
              (("unrolled", unrolled_c), ("scanned", scanned_c))}
    scaling = factory.validate(scanned_c)
    rows = {k: {tuple(r["path"].split("/")): r for r in describe.describe(m, scaling)}
            for k, m in models.items()}
    mesh = jax.make_mesh((1, 2, 2, 2), sharding.MESH_AXES, devices=jax.devices()[:8])
    per_model = {k: {"lr": flat(optim.lr_multipliers(scaling, m)),
                     "eps": flat(optim.eps_multipliers(scaling, m)),
                     "decay": flat(optim.decay_mask(nnx.state(m, nnx.Param))),
                     "spec": flat(sharding.param_specs(nnx.state(m, nnx.Param), mesh))}
                 for k, m in models.items()}
    stacked_paths = 0
    for path, row in rows["scanned"].items():
        stacked = path[0] == "groups"
        stacked_paths += stacked
        for g in range(2 if stacked else 1):
            want = rows["unrolled"][tuple(map(str, as_unrolled(path, g, moe_every)))]
            params_path = tuple(int(p) if p.isdigit() and not stacked else p for p in path)
            assert row["axes"] == (["layers"] if stacked else []) + want["axes"], path
            assert row["shape"] == ([2] if stacked else []) + want["shape"], path
            for field in ("role", "fan_in", "init", "init_std", "multiplier", "lr_scale",
                          "eps_scale"):
                assert row[field] == want[field], (path, field)
            for name, values in per_model["scanned"].items():
                theirs = per_model["unrolled"][name][as_unrolled(params_path, g, moe_every)]
                if name == "spec":
                    theirs = jax.sharding.PartitionSpec(*((None,) if stacked else ()), *theirs)
                assert values[params_path] == theirs, (path, name)
    assert stacked_paths > 10


def test_scanning_needs_whole_groups():
    with pytest.raises(ConfigError, match=r"scan_layers needs shape.depth \(3\) divisible by "
                                          r"moe_every \(2\)"):
        factory.build_model(config(2, True, depth=3), nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"remat must be one of \['none', 'full', "
                                          r"'dots_saveable'\]"):
        factory.validate(config(1, True, remat="all"))
