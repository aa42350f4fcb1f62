"""The training loop's overhead over its bare jitted step, as ratios measured in one run.

Run: python benchmarks/loop_overhead.py [--quick] [--steps 200] [--rounds 3] [--log-every 10]

Three ways to take the same train step (configs/transformer_moe.py, the main job; `--quick`: a
tiny MLP-MoE that only checks the script works), interleaved in rounds so that load from other
processes hits them alike:

* bare: the jitted step (`train.make_train_step`) on one batch already on the device, one wait
  at the end: the floor;
* synced: the same, converting the loss to a Python float every step (what the loop did before it
  fetched metrics every `log_every` steps): the cost of a per-step host sync;
* loop: `train.train` itself (batches drawn on the host and placed on the mesh, metrics fetched
  every `log_every` steps, no evaluation or checkpoints), timed by its own `steps_per_s`
  records (compilation excluded).

Printed: the best round's ms per step of each, and the ratios loop / bare and synced / bare.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from configs import mlp_moe, transformer_moe  # noqa: E402
from mssp_jax import data, metrics, train  # noqa: E402


def quick_config():
    c = mlp_moe.get_config()
    for s in (c.shape, c.base_shape):
        s.update(width=16, expert_width=8, num_experts=4, top_k=2)
    c.batch_size = 16
    return c


def bare(program: train.Program, steps: int, sync_every_step: bool) -> float:
    """Seconds per step of the jitted step alone (compiled before the clock starts)."""
    step = train.make_train_step(program)
    examples = data.load(program.config, program.config.data.train_split)
    batch = program.global_batch(next(data.Batches(examples, program.config.batch_size, 0)))
    state, out = step(train.init_state(program), batch)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(steps):
        state, out = step(state, batch)
        if sync_every_step:
            float(out["loss"])
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def loop(program: train.Program, steps: int) -> float:
    """Seconds per step of `train.train`, from its steps_per_s records (fresh workdir)."""
    with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(io.StringIO()):
        status = train.train(program, Path(workdir))
        records = metrics.read(workdir, "train")
    assert status == train.DONE, status
    timed = [(step, r["steps_per_s"]) for step, r in records.items() if "steps_per_s" in r]
    previous = [1] + [step for step, _ in timed[:-1]]  # the rates count from the first step
    return sum((step - prev) / rate for (step, rate), prev in zip(timed, previous)) / (steps - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny MLP-MoE, few steps")
    parser.add_argument("--steps", type=int, default=200, help="steps per program per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--log-every", type=int, default=10, help="the loop's log_every")
    args = parser.parse_args()
    config = quick_config() if args.quick else transformer_moe.get_config()
    steps, rounds = (20, 1) if args.quick else (args.steps, args.rounds)
    config.update(dict(steps=steps, log_every=args.log_every, eval_every=0, checkpoint_every=0))
    program = train.setup(config)
    programs: dict[str, Callable[[], float]] = {
        "bare": lambda: bare(program, steps, sync_every_step=False),
        "synced": lambda: bare(program, steps, sync_every_step=True),
        "loop": lambda: loop(program, steps),
    }
    seconds: dict[str, list[float]] = {name: [] for name in programs}
    for _ in range(rounds):
        for name, run in programs.items():
            seconds[name].append(run())
    best = {name: min(ts) for name, ts in seconds.items()}
    print(json.dumps({
        "model": config.model, "backend": jax.default_backend(), "devices": jax.device_count(),
        "steps_x_rounds": [steps, rounds], "log_every": args.log_every,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "ms_per_step_best_round": {name: round(1e3 * s, 3) for name, s in best.items()},
        "loop / bare": round(best["loop"] / best["bare"], 3),
        "synced / bare": round(best["synced"] / best["bare"], 3)}, indent=1))


if __name__ == "__main__":
    main()
