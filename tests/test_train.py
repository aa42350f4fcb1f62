"""The training loop: exact resume (SIGKILL; SIGINT / SIGTERM save and stop), divergence stop,
main-job outputs, config errors."""

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
from mssp_jax import checkpoint, metrics, preemption, train
from mssp_jax.scaling import ConfigError
from tests import tensorboard_events

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
    logged = logged_steps(killed)
    assert logged == sorted(set(logged)) and logged[-1] == steps  # each step once


def logged_steps(workdir, kind="train"):
    """Steps of the JSONL's `kind` records, in file order, repeats included."""
    lines = (Path(workdir) / metrics.METRICS_FILE).read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == kind]


def logged_values(workdir):
    """step -> the train metrics without the timing ones."""
    return {step: {k: v for k, v in record.items() if not k.endswith("_per_s")}
            for step, record in metrics.read(workdir, "train").items()}


def train_command(workdir, data_dir, *flags):
    return [sys.executable, "run.py", "train", "--config", "configs/mlp_moe.py",
            f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", "--config.batch_size=16",
            "--config.eval_every=0", *flags]


def interrupt_after(cmd, workdir, step, sig):
    """Starts `cmd`, sends `sig` once the JSONL has a train record at `step` or later; returns
    (exit status, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    jsonl = Path(workdir) / metrics.METRICS_FILE

    def logged():  # complete lines only: the run is writing the file
        lines = jsonl.read_text().splitlines(keepends=True) if jsonl.exists() else []
        return max((json.loads(line)["step"] for line in lines if line.endswith("\n")), default=0)

    while proc.poll() is None and logged() < step:
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def stopped_step(out, sig):
    """The step in the run's last line 'stopped by SIG... at step <n>: checkpoint saved in ...'."""
    last = out.strip().splitlines()[-1]
    assert (last.startswith(f"stopped by {sig.name} at step ")
            and "run the same command" in last), out
    return int(last.split(" at step ")[1].split(":")[0])


def test_sigint_then_sigterm_save_and_resume_each_step_once(data_dir, tmp_path, capsys):
    """Real signals to real `run.py train` processes: each saves the step it stopped at and exits
    with INTERRUPTED, without a traceback; the restarts resume there, and the outputs list every
    step once (JSONL and TensorBoard) with the values of an uninterrupted run."""
    workdir = tmp_path / "interrupted"
    cmd = train_command(workdir, data_dir, "--config.steps=100000", "--config.log_every=1",
                        "--config.checkpoint_every=0")
    first = interrupt_after(cmd, workdir, 3, signal.SIGINT)
    assert first[0] == train.INTERRUPTED and "Traceback" not in first[2], first[2][-3000:]
    stop1 = stopped_step(first[1], signal.SIGINT)
    assert final_checkpoint(workdir)[:2] == (stop1, stop1) and stop1 >= 3

    second = interrupt_after(cmd, workdir, stop1 + 3, signal.SIGTERM)
    assert second[0] == train.INTERRUPTED and "Traceback" not in second[2], second[2][-3000:]
    assert f"resumed from step {stop1} " in second[1]
    stop2 = stopped_step(second[1], signal.SIGTERM)
    assert final_checkpoint(workdir)[:2] == (stop2, stop2) and stop2 >= stop1 + 3

    steps = stop2 + 2  # the classifier evaluates once, at the end
    config = mlp_config(data_dir, steps=steps, log_every=1, checkpoint_every=0, eval_every=steps)
    assert train.main("train", config, str(workdir)) == train.DONE
    out = capsys.readouterr().out.strip().splitlines()
    assert f"resumed from step {stop2} ({workdir / 'checkpoints'})" in out
    evaluated = metrics.read(workdir, "eval")[steps]
    assert f"eval at step {steps}: loss {evaluated['loss']:.4f}" in "\n".join(out)
    assert out[-1] == (f"final eval loss {evaluated['loss']:.4f}, accuracy "
                       f"{evaluated['accuracy']:.4f} at step {steps}")
    assert train.main("train", config, str(tmp_path / "uninterrupted")) == train.DONE
    assert logged_steps(workdir) == list(range(1, steps + 1))
    assert logged_values(workdir) == logged_values(tmp_path / "uninterrupted")
    record = metrics.read(workdir, "train")[steps]
    assert 0 <= record["accuracy"] <= 1 and "examples_per_s" in record
    assert "tokens_per_s" not in record  # a classifier's throughput is in examples
    shown = tensorboard_events.scalars(workdir / "tensorboard")
    assert [s for s, _ in shown["train/loss"]] == list(range(1, steps + 1))
    assert [v for _, v in shown["train/loss"]] == pytest.approx(
        [r["loss"] for r in metrics.read(workdir, "train").values()], rel=1e-6)


def test_a_signal_requests_a_stop_and_a_second_acts_as_without_us():
    # The second signal's effect is checked as the handler in place, not by raising
    # KeyboardInterrupt: that could land in a GC callback, which swallows it.
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with preemption.StopSignals() as stop:
        assert not stop.reached(1)
        os.kill(os.getpid(), signal.SIGINT)
        while stop.received is None:  # the handler runs on the main thread, soon
            time.sleep(0.01)
        assert stop.reached(2) and stop.describe() == "SIGINT"
        assert signal.getsignal(signal.SIGINT) is handlers[0]  # a second SIGINT: Python's own
        assert signal.getsignal(signal.SIGTERM) is not handlers[1]  # SIGTERM still ours
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_divergence_stops_cleanly_and_keeps_earlier_outputs(data_dir, tmp_path, capsys):
    c = mlp_config(data_dir, steps=10, checkpoint_every=1, log_every=1)
    c.optimizer.learning_rate = 1e30
    assert train.main("train", c, str(tmp_path)) == train.DIVERGED
    record = json.loads((tmp_path / train.DIVERGENCE_FILE).read_text())
    assert record["step"] >= 2 and np.isfinite(record["last_finite_loss"])
    assert record["last_finite_step"] == record["step"] - 1 == record["stopped_at_step"] - 1
    logged = metrics.read(tmp_path, "train")
    assert logged[record["last_finite_step"]]["loss"] == pytest.approx(record["last_finite_loss"])
    step, _, params = final_checkpoint(tmp_path)
    assert step == record["last_finite_step"]  # the non-finite state was never saved
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert (tmp_path / metrics.LOSS_CURVE_FILE).exists()
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith(f"diverged: loss {float(record['loss'])} at step {record['step']} ")

    # Metrics fetched every 7 steps only: the same first bad step, found within 7 steps.
    lazy = tmp_path / "lazy"
    c.update(dict(log_every=7, checkpoint_every=0))
    assert train.main("train", c, str(lazy)) == train.DIVERGED
    found = json.loads((lazy / train.DIVERGENCE_FILE).read_text())
    assert {k: found[k] for k in record if k != "stopped_at_step"} == {
        k: record[k] for k in record if k != "stopped_at_step"}
    assert found["step"] <= found["stopped_at_step"] < found["step"] + 7
    assert not list((lazy / "checkpoints").glob("[0-9]*"))


def test_main_job_writes_its_outputs_and_eval_reproduces_them(data_dir, tmp_path, capsys):
    c = transformer_moe.get_config()
    c.data.data_dir = data_dir
    c.base_shape = c.shape = common.shape(width=32, expert_width=32, num_experts=4, top_k=2)
    c.update(dict(steps=4, batch_size=4, seq_len=16, eval_every=2, eval_steps=1,
                  checkpoint_every=2, log_every=1))
    assert train.main("train", c, str(tmp_path)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    evals = metrics.read(tmp_path, "eval")
    assert [line.split(":")[0] for line in out if line.startswith("eval at")] == [
        "eval at step 2", "eval at step 4"]  # printed when computed
    assert out[-2].startswith(f"outputs in {tmp_path}: ")
    assert out[-1] == f"final eval loss {evals[4]['loss']:.4f} at step 4"  # no accuracy: an LM
    for name in ("metrics.jsonl", "loss_curve.png", "config.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").glob("[0-9]*")) == [2, 4]
    logged = metrics.read(tmp_path, "train")
    assert sorted(logged) == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "router_entropy", "load_max", "steps_per_s",
            "tokens_per_s"} <= set(logged[4])
    assert "accuracy" not in logged[4] and "examples_per_s" not in logged[4]
    trained_eval = metrics.read(tmp_path, "eval")[4]["loss"]
    assert train.main("eval", c, str(tmp_path)) == 0
    assert metrics.read(tmp_path, "eval")[4]["loss"] == pytest.approx(trained_eval, rel=1e-6)
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"final eval loss {metrics.read(tmp_path, 'eval')[4]['loss']:.4f} at step 4")


@pytest.mark.parametrize("field,value", [("steps", 0), ("eval_every", -1), ("keep_checkpoints", 0)])
def test_bad_loop_fields_are_named_before_compute(data_dir, field, value):
    with pytest.raises(ConfigError, match=field):
        train.setup(mlp_config(data_dir, **{field: value}))


def test_dense_ffn_only_transformer_takes_a_train_step():
    """No MoE block (moe_every beyond the depth): no router metrics, no load-balancing term."""
    config = transformer_moe.get_config()
    config.batch_size, config.seq_len = 4, 16
    config.moe_every = config.shape.depth + 1
    program = train.setup(config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (4, 17))
    batch = program.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    _, out = train.make_train_step(program)(train.init_state(program), batch)
    assert "aux_loss" not in out and np.isfinite(float(out["loss"]))
    assert float(out["loss"]) == float(out["task_loss"])
