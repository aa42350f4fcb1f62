"""Sharded training on 8 CPU devices: every mesh computes the same training run, and every mesh
compiles without XLA's "involuntary full rematerialization" (a reshard it can only do by
replicating).

Tolerance: the meshes differ only in how float32 sums are split and ordered (all-reduces,
reduce-scatters, per-shard matmuls), a few ulps (~1e-7 relative) per op. Adam's update
g / (sqrt(v) + eps) passes the relative error of g through, so after a few steps at LR 1e-2 the
parameters (entries ~0.1-1) may differ by ~lr x 1e-4 = 1e-6; measured: <= 1.1e-5 absolute on
parameters, <= 2.4e-7 relative on losses. We allow 1e-4 and 1e-5: a routing or layout bug moves
the affected entries by ~lr = 1e-2, two orders above.
"""

from __future__ import annotations

import functools
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import mlp_moe, transformer_moe
from mssp_jax import checkpoint, dispatch, expert_parallel, factory, models, sharding, train
from mssp_jax.moe import MoE
from mssp_jax.scaling import ConfigError
from tests.compile_log import remat_warnings, stderr_lines

STEPS = 4
PARAM_ATOL, LOSS_RTOL = 1e-4, 1e-5
MESHES = {  # (data, expert) meshes, all four axes, and three axes without expert parallelism
    "single": dict(),
    "(1,8)": dict(data=1, expert=8),
    "(2,4)": dict(data=2, expert=4),
    "(8,1)": dict(data=8, expert=1),
    "fsdp2_expert2_tensor2": dict(fsdp=2, expert=2, tensor=2),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}


def tiny_config(**mesh):
    c = mlp_moe.get_config()
    for s in (c.shape, c.base_shape):
        s.update(width=16, expert_width=8, num_experts=8, top_k=2)
    c.batch_size = 16  # input_dim 64, 10 classes: the embedded digits
    c.mesh.update(mesh)
    return c


def batches():
    rng = np.random.default_rng(0)
    return [{"inputs": rng.normal(size=(16, 64)).astype(np.float32),
             "targets": rng.integers(0, 10, 16)} for _ in range(STEPS)]


@functools.cache
def initial_state():
    """Host copy of the initial state (each run places a fresh copy: steps donate their input)."""
    return jax.tree.map(np.asarray, train.init_state(train.setup(tiny_config())))


@functools.cache
def compiled(name: str):
    """(program, train step, what XLA logged while compiling the step)."""
    program = train.setup(tiny_config(**MESHES[name]))
    step = train.make_train_step(program)
    with stderr_lines() as log:
        step.lower(program.abstract_state, batches()[0]).compile()
    return program, step, log


def run(name: str, state=None, data=None):
    program, step, _ = compiled(name)
    state = jax.device_put(initial_state() if state is None else state, program.state_shardings)
    losses = []
    for batch in batches() if data is None else data:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, np.array(losses)


@functools.cache
def reference():
    state, losses = run("single")
    return jax.tree.map(np.asarray, state), losses


def assert_close(state, ref):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=PARAM_ATOL),
                 state["params"], ref["params"])


@pytest.mark.parametrize("name", [n for n in MESHES if n != "single"])
def test_meshes_train_identically(name):
    ref, losses = reference()
    state, mesh_losses = run(name)
    moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), ref["params"],
                         initial_state()["params"])
    assert min(jax.tree.leaves(moved)) > 10 * PARAM_ATOL  # every parameter moved past the tolerance
    np.testing.assert_allclose(mesh_losses, losses, rtol=LOSS_RTOL)
    assert_close(state, ref)
    assert not remat_warnings(compiled(name)[2])


def moe_dispatches(program):
    model = nnx.merge(program.graphdef, program.abstract_state["params"])
    return [m.dispatch for _, m in nnx.iter_modules(model) if isinstance(m, MoE)]


def test_expert_meshes_route_tokens_by_all_to_all_others_on_each_device():
    program = compiled("(2,4)")[0]
    assert moe_dispatches(program) and all(d.func is expert_parallel.expert_parallel
                                           and d.keywords["mesh"] is program.mesh
                                           for d in moe_dispatches(program))
    program = compiled("data2_fsdp2_tensor2")[0]
    auto = dispatch.get("auto")
    assert moe_dispatches(program) and all(d.func is expert_parallel.token_parallel
                                           and d.keywords["dispatch"] is auto
                                           for d in moe_dispatches(program))
    assert moe_dispatches(compiled("single")[0]) == [auto]  # one device: the dispatch as is


def transformer_config(**mesh):
    c = transformer_moe.get_config()
    for s in (c.shape, c.base_shape):
        s.update(width=16, expert_width=8, num_experts=4, top_k=2, depth=2)
    c.head_dim, c.moe_every, c.batch_size, c.seq_len = 8, 2, 8, 16  # a dense and an MoE block
    c.mesh.update(mesh)
    return c


@pytest.mark.parametrize("mesh", [dict(fsdp=2, expert=2, tensor=2), dict(data=2, fsdp=4)])
def test_transformer_steps_compile_without_rematerialization(mesh):
    program = train.setup(transformer_config(**mesh))
    tokens = jax.ShapeDtypeStruct((8, 16), np.int32)
    with stderr_lines() as log:  # the train step holds the eval step's forward pass
        train.make_train_step(program).lower(
            program.abstract_state, {"inputs": tokens, "targets": tokens}).compile()
    assert not remat_warnings(log), remat_warnings(log)[:1]


def scanned_transformer_run(**mesh):
    """(losses of STEPS steps, what XLA logged compiling the step) of a scanned Transformer-MoE
    (two groups of a dense and an MoE block, remat on)."""
    c = transformer_config(**mesh)
    c.shape.depth = c.base_shape.depth = 4
    c.scan_layers, c.remat = True, "full"
    program = train.setup(c)
    step = train.make_train_step(program)
    tokens = np.random.default_rng(0).integers(0, c.vocab_size, (STEPS, 8, 17))
    with stderr_lines() as log:
        step.lower(program.abstract_state, {"inputs": tokens[0, :, :-1],
                                            "targets": tokens[0, :, 1:]}).compile()
    state, losses = train.init_state(program), []
    for t in tokens:
        state, metrics = step(state, {"inputs": t[:, :-1], "targets": t[:, 1:]})
        losses.append(float(metrics["loss"]))
    return np.array(losses), log


def test_scanned_transformer_trains_on_a_mesh_as_on_one_device():
    want, _ = scanned_transformer_run()
    got, log = scanned_transformer_run(fsdp=2, expert=2, tensor=2)
    assert want[-1] < want[0]
    np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)
    assert not remat_warnings(log), remat_warnings(log)[:1]


def test_the_log_capture_sees_the_warning_and_constrain_avoids_it():
    """The embedding lookup from a table split on `embed` warns; reading whole rows does not."""
    mesh = sharding.make_mesh(tiny_config(fsdp=2, expert=2, tensor=2))
    table = jax.ShapeDtypeStruct((256, 32), np.float32,
                                 sharding=jax.NamedSharding(mesh, P(None, "fsdp")))
    tokens = jax.ShapeDtypeStruct((8, 16), np.int32, sharding=sharding.data_sharding(mesh))

    def lookup(table, tokens, whole_rows):
        with sharding.activation_rules(mesh):
            rows = models.constrain(table, ("vocab", None)) if whole_rows else table
            return models.constrain(rows[tokens])

    for whole_rows, warned in ((False, True), (True, False)):
        with stderr_lines() as log:
            jax.jit(functools.partial(lookup, whole_rows=whole_rows)).lower(table, tokens).compile()
        assert bool(remat_warnings(log)) == warned


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    ref, losses = reference()
    first, second = batches()[:2], batches()[2:]
    start = train.init_state(compiled("(2,4)")[0])  # created sharded: same values as 1 device
    jax.tree.map(np.testing.assert_array_equal, start, initial_state())
    state, _ = run("(2,4)", state=start, data=first)
    ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=1)
    ckpt.save(2, state, data_position=2, seed=0)
    ckpt.close()
    target = compiled("fsdp2_expert2_tensor2")[0]
    restored = checkpoint.Checkpointer(tmp_path, every=1, keep=1).restore_latest(
        target.abstract_state, seed=0)
    assert restored.step == 2
    for leaf, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(target.state_shardings)):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    jax.tree.map(np.testing.assert_array_equal, restored.state, state)  # bit-exact
    continued, tail_losses = run("fsdp2_expert2_tensor2", state=restored.state, data=second)
    np.testing.assert_allclose(tail_losses, losses[2:], rtol=LOSS_RTOL)
    assert_close(continued, ref)


# The mesh each logical axis asks for, written out independently of sharding.LOGICAL_RULES.
EXPECTED_MESH_AXIS = {"embed": "fsdp", "expert": "expert", "heads": "tensor", "mlp": "tensor",
                      "expert_mlp": "tensor"}


def test_every_parameter_lands_where_its_labels_ask():
    c = transformer_config(fsdp=2, expert=2, tensor=2)
    state = train.init_state(train.setup(c))
    labels = nnx.to_flat_state(nnx.state(nnx.eval_shape(
        lambda: factory.build_model(c, nnx.Rngs(0))), nnx.Param))
    placed = dict(nnx.to_flat_state(state["params"]))
    seen = set()
    for path, var in labels:
        axes = var.get_metadata()["out_sharding"]
        seen.update(axes)
        spec = P(*(EXPECTED_MESH_AXIS.get(a) for a in axes))
        array = placed[path]
        assert array.sharding.spec == spec, (path, axes)
        local = tuple(d // (2 if m else 1) for d, m in zip(array.shape, spec))
        assert all(s.data.shape == local for s in array.addressable_shards), path
    assert {"embed", "expert", "heads", "mlp", "expert_mlp"} <= seen


@pytest.mark.parametrize("mesh, field", [
    (dict(data=3), "mesh"),  # 3 does not divide 8 devices
    (dict(data=2, fsdp=2, expert=2, tensor=2), "divide the device count"),  # 16 > 8
    (dict(data=-1, fsdp=-1), "-1"),
    (dict(data=0), "mesh.data"),
    (dict(expert=8, data=1, num_experts=4), "mesh.expert"),  # M = 4 on 8 expert shards
    (dict(data=8, batch_size=12), "batch_size"),
])
def test_bad_mesh_configs_name_the_field(mesh, field):
    c = tiny_config()
    experts, batch = mesh.pop("num_experts", None), mesh.pop("batch_size", None)
    if experts:
        c.shape.num_experts = c.base_shape.num_experts = experts
    if batch:
        c.batch_size = batch
    c.mesh.update(mesh)
    with pytest.raises(ConfigError, match=field):
        sharding.make_mesh(c)


def test_parameter_the_mesh_cannot_split_is_named():
    c = tiny_config(fsdp=8)
    for s in (c.shape, c.base_shape):
        s.width = 12  # 'embed' dims of 12 over 8 fsdp shards
    with pytest.raises(ConfigError, match=r"moe.*'embed' of size 12 .*mesh\.fsdp"):
        train.setup(c)


def test_shard_model_places_params_and_keeps_the_function():
    c = tiny_config()
    program = train.setup(c)
    params = initial_state()["params"]
    inputs = batches()[0]["inputs"]
    want, _ = nnx.merge(program.graphdef, params)(inputs)
    mesh = sharding.make_mesh(tiny_config(data=2, expert=4))
    model = sharding.shard_model(nnx.merge(program.graphdef, params), mesh)
    assert model.moe.w_up[...].sharding.spec == P("expert", "fsdp", "tensor")
    assert model.moe.dispatch.keywords["mesh"] is mesh
    got, _ = nnx.jit(lambda m, x: m(x))(model, inputs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_sharding_does_not_import_the_training_loop():
    """One path: `train` builds its steps on `sharding`'s placement, never the other way."""
    code = "import sys, mssp_jax.sharding; print('mssp_jax.train' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=pathlib.Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
