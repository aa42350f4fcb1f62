"""The training loop: exact resume (incl. SIGKILL), divergence stop, main-job outputs, config errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import common, mlp_moe, transformer_moe
from mssp_jax import checkpoint, metrics, train
from mssp_jax.scaling import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def mlp_config(data_dir, **overrides):
    c = mlp_moe.get_config()
    c.data.data_dir = data_dir
    c.update(dict(steps=20, batch_size=16, eval_every=0, checkpoint_every=10, log_every=10))
    c.update(overrides)
    return c


def final_checkpoint(workdir, seed=0):
    """(step, data position, params as saved) of the workdir's latest checkpoint."""
    ckpt = checkpoint.Checkpointer(Path(workdir) / "checkpoints", 1, 1)
    restored = ckpt.restore_latest(None, seed)
    ckpt.close()
    return restored.step, restored.data_position, restored.state["params"]


def assert_same_params(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigkill_mid_run_then_restart_equals_one_run(data_dir, tmp_path):
    steps, every = 600, 50
    killed = tmp_path / "killed"
    cmd = [sys.executable, "run.py", "train", "--config", "configs/mlp_moe.py",
           f"--workdir={killed}", f"--config.data.data_dir={data_dir}", f"--config.steps={steps}",
           "--config.batch_size=16", "--config.eval_every=0", f"--config.checkpoint_every={every}",
           "--config.log_every=100"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = killed / "checkpoints"
    while proc.poll() is None and not any(p.name.isdigit() and int(p.name) >= every
                                          for p in ckpts.glob("*")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    saved = max(int(p.name) for p in ckpts.glob("*") if p.name.isdigit())
    assert every <= saved < steps  # killed mid-run, after a checkpoint

    config = mlp_config(data_dir, steps=steps, checkpoint_every=every)
    assert train.main("train", config, str(killed)) == 0
    assert train.main("train", config, str(tmp_path / "full")) == 0
    resumed, full = final_checkpoint(killed), final_checkpoint(tmp_path / "full")
    assert resumed[:2] == full[:2] == (steps, steps)
    assert_same_params(resumed[2], full[2])


def test_divergence_stops_cleanly_and_keeps_earlier_outputs(data_dir, tmp_path, capsys):
    c = mlp_config(data_dir, steps=10, checkpoint_every=1, log_every=1)
    c.optimizer.learning_rate = 1e30
    assert train.main("train", c, str(tmp_path)) == train.DIVERGED
    record = json.loads((tmp_path / train.DIVERGENCE_FILE).read_text())
    assert record["step"] >= 2 and np.isfinite(record["last_finite_loss"])
    assert record["last_finite_step"] == record["step"] - 1
    logged = metrics.read(tmp_path, "train")
    assert logged[record["last_finite_step"]]["loss"] == pytest.approx(record["last_finite_loss"])
    step, _, params = final_checkpoint(tmp_path)
    assert step == record["last_finite_step"]  # the non-finite state was never saved
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert (tmp_path / metrics.LOSS_CURVE_FILE).exists()
    assert "diverged" in capsys.readouterr().out


def test_main_job_writes_its_outputs_and_eval_reproduces_them(data_dir, tmp_path, capsys):
    c = transformer_moe.get_config()
    c.data.data_dir = data_dir
    c.base_shape = c.shape = common.shape(width=32, expert_width=32, num_experts=4, top_k=2)
    c.update(dict(steps=4, batch_size=4, seq_len=16, eval_every=2, eval_steps=1,
                  checkpoint_every=2, log_every=1))
    assert train.main("train", c, str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "final loss" in out
    for name in ("metrics.jsonl", "loss_curve.png", "config.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").glob("[0-9]*")) == [2, 4]
    logged = metrics.read(tmp_path, "train")
    assert sorted(logged) == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "router_entropy", "load_max", "steps_per_s",
            "tokens_per_s"} <= set(logged[4])
    trained_eval = metrics.read(tmp_path, "eval")[4]["loss"]
    assert train.main("eval", c, str(tmp_path)) == 0
    assert metrics.read(tmp_path, "eval")[4]["loss"] == pytest.approx(trained_eval, rel=1e-6)


@pytest.mark.parametrize("field,value", [("steps", 0), ("eval_every", -1), ("keep_checkpoints", 0)])
def test_bad_loop_fields_are_named_before_compute(data_dir, field, value):
    with pytest.raises(ConfigError, match=field):
        train.setup(mlp_config(data_dir, **{field: value}))
