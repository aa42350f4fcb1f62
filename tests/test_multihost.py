"""Multi-host for real: two processes joined by `jax.distributed` over loopback (2 CPU devices
each, gloo collectives) train exactly like one process with the same 4-device mesh."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ["run.py", "train", "--config", "configs/mlp_moe.py", "--config.steps=12",
         "--config.eval_every=6", "--config.checkpoint_every=6", "--config.mesh.data=2",
         "--config.mesh.expert=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices: int) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def losses(workdir: pathlib.Path) -> list[tuple]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows if "loss" in row]


def test_two_processes_train_like_one(tmp_path):
    port, multi = free_port(), tmp_path / "two_processes"
    procs = [subprocess.Popen(
        [sys.executable, *TRAIN, "--workdir", str(multi), "--config.distributed.initialize=True",
         f"--config.distributed.coordinator_address=127.0.0.1:{port}",
         "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
        cwd=ROOT, env=env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    single = tmp_path / "one_process"
    out = subprocess.run([sys.executable, *TRAIN, "--workdir", str(single)], cwd=ROOT, env=env(4),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got, want = losses(multi), losses(single)
    assert len(want) >= 4 and [s for s, _ in got] == [s for s, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert abs(a - b) <= 1e-5 * abs(b), (got, want)  # same mesh, same reduction order
    assert "final loss" in outputs[0] and "final loss" not in outputs[1]  # only process 0 reports
