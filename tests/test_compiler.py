"""Compiler options of our steps: on CPU the train/eval steps compile without YNNPACK fusions
(XLA's Eigen kernels instead), a user's XLA_FLAGS choice wins, and the results do not change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import transformer_moe
from mssp_jax import compiler, train

YNN_FUSION = "__ynn_fusion"  # the custom fusion kind YNNPACK library calls compile to


def ynn_fusions(jitted, *args) -> int:
    return jitted.lower(*args).compile().as_text().count(YNN_FUSION)


@pytest.fixture
def no_user_flag(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def test_user_sets_reads_both_flag_spellings():
    flag = compiler.YNN_FUSION_FLAG
    assert compiler.user_sets(flag, f"--foo=1 --{flag}=-individual_dot")
    assert compiler.user_sets(flag, f"--{flag} +eltwise")
    assert not compiler.user_sets(flag, f"--{flag}_other=1 --xla_cpu_use_thunk_runtime=true")
    assert not compiler.user_sets(flag, "")


def test_cpu_steps_compile_without_ynnpack_fusions(no_user_flag):
    assert compiler.options("cpu") == compiler.CPU_OPTIONS
    assert compiler.options("tpu") is None
    a = jnp.ones((256, 256))
    matmul = lambda x: x @ x  # noqa: E731
    assert ynn_fusions(jax.jit(matmul), a) >= 1  # the default this module turns off
    assert ynn_fusions(compiler.jit(matmul), a) == 0
    rows = lambda x: jnp.sum(x, 0)  # noqa: E731
    assert ynn_fusions(compiler.jit(rows), a) == 0


def test_user_xla_flag_is_respected(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--{compiler.YNN_FUSION_FLAG}=+eltwise")
    assert compiler.options("cpu") is None


def tiny_program():
    config = transformer_moe.get_config()
    config.batch_size, config.seq_len = 4, 16
    return train.setup(config)


def test_train_step_equal_with_and_without_the_options(no_user_flag, monkeypatch):
    program = tiny_program()
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, program.config.vocab_size)
    batch = program.global_batch({"inputs": np.asarray(tokens[:, :-1]),
                                  "targets": np.asarray(tokens[:, 1:])})
    results, fusions = {}, {}
    for name, table in (("ours", compiler.OPTIONS), ("xla default", {})):
        monkeypatch.setattr(compiler, "OPTIONS", table)
        step = train.make_train_step(program)
        fusions[name] = ynn_fusions(step, train.init_state(program), batch)
        results[name] = step(train.init_state(program), batch)
        results[name + " eval"] = train.make_eval_step(program)(
            train.init_state(program)["params"], batch)
    assert fusions["ours"] < fusions["xla default"]
    for a, b in ((results["ours"], results["xla default"]),
                 (results["ours eval"], results["xla default eval"])):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-6)
