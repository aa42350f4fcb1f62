"""Multi-host for real: two processes joined by `jax.distributed` over loopback (2 CPU devices
each, gloo collectives). A SIGTERM to one of them stops both at the same step with a checkpoint
(JAX's preemption sync point); restarted, they finish the run exactly like one process with the
same 4-device mesh."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

from configs import mlp_moe
from mssp_jax import data, train
from tests.compile_log import REMAT_WARNING

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = ["--config.log_every=1", "--config.eval_every=4", "--config.checkpoint_every=0",
         "--config.mesh.data=2", "--config.mesh.expert=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices: int) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def start_two(workdir: pathlib.Path, data_dir: str, steps: int) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen(
        [sys.executable, "run.py", "train", "--config", "configs/mlp_moe.py", *FLAGS,
         f"--config.steps={steps}", f"--config.data.data_dir={data_dir}", "--workdir", str(workdir),
         "--config.distributed.initialize=True",
         f"--config.distributed.coordinator_address=127.0.0.1:{port}",
         "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
        cwd=ROOT, env=env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]


def records(workdir: pathlib.Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
    return [json.loads(line) for line in lines if line.endswith("\n")]  # complete lines only


def losses(workdir: pathlib.Path) -> list[tuple]:
    return [(r["kind"], r["step"], r["loss"]) for r in records(workdir)]


def test_preempted_processes_agree_resume_and_train_like_one(tmp_path):
    data_dir = str(tmp_path / "tfds")
    config = mlp_moe.get_config()
    config.data.data_dir = data_dir
    data.load(config, "train")  # prepared once here, not by both processes at the same time
    multi = tmp_path / "two_processes"
    procs = start_two(multi, data_dir, steps=100_000)
    while all(p.poll() is None for p in procs) and not (
            (multi / "metrics.jsonl").exists() and len(records(multi)) >= 3):
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # one process only: both must stop at the same step
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [train.INTERRUPTED] * 2, (
        outputs[0][-3000:] + outputs[1][-3000:])
    last_lines = [out.strip().splitlines()[-1] for out in outputs]
    assert all(line.startswith("stopped by SIGTERM") for line in last_lines), last_lines
    stops = {int(line.split(" at step ")[1].split(":")[0]) for line in last_lines}
    assert len(stops) == 1, last_lines
    stop = stops.pop()
    assert sorted(int(p.name) for p in (multi / "checkpoints").glob("[0-9]*")) == [stop]

    steps = stop + 3
    procs = start_two(multi, data_dir, steps)
    resumed = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [train.DONE] * 2, (
        resumed[0][-3000:] + resumed[1][-3000:])
    assert all(f"resumed from step {stop} " in out for out in resumed)
    # process 0 reports
    assert "final eval loss" in resumed[0] and "final eval loss" not in resumed[1]

    single = tmp_path / "one_process"
    out = subprocess.run([sys.executable, "run.py", "train", "--config", "configs/mlp_moe.py",
                          *FLAGS, f"--config.steps={steps}", f"--config.data.data_dir={data_dir}",
                          "--workdir", str(single)],
                         cwd=ROOT, env=env(4), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got, want = losses(multi), losses(single)
    assert [r[:2] for r in got] == [r[:2] for r in want]  # every step (and eval) once, in order
    assert [s for kind, s, _ in got if kind == "train"] == list(range(1, steps + 1))
    for (_, _, a), (_, _, b) in zip(got, want):
        assert abs(a - b) <= 1e-5 * abs(b), (got, want)  # same mesh, same reduction order
    for log in [*outputs, *resumed, out.stderr]:
        assert REMAT_WARNING not in log
