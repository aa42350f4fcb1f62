"""Step time of the default Transformer-MoE (configs/transformer_moe.py) on 1 vs 8 CPU devices.

Run: python benchmarks/mesh_step_time.py [--steps 10] [--rounds 3]
Each mesh trains on the same random byte batches; rounds are interleaved across meshes so that
load from other processes hits all of them alike, and the reported ratio (time on the mesh /
time on one device) comes from the same run. The forced host devices share the machine's cores,
so on CPU this measures the sharding overhead, not a speed-up.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import transformer_moe  # noqa: E402
from mssp_jax import train  # noqa: E402

MESHES = {"1 device": {}, "data=8": dict(data=8), "fsdp=8": dict(fsdp=8),
          "data=2,expert=4": dict(data=2, expert=4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per mesh")
    args = parser.parse_args()
    base = transformer_moe.get_config()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, base.vocab_size, (base.batch_size, base.seq_len + 1))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    runs = {}
    for name, mesh in MESHES.items():
        config = transformer_moe.get_config()
        config.mesh.update(mesh)
        program = train.setup(config)
        state, step = train.init_state(program), train.make_train_step(program)
        state, _ = step(state, batch)  # compile
        runs[name] = [state, step, []]
    for _ in range(args.rounds):
        for name, run in runs.items():
            state, step, times = run
            start = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append((time.perf_counter() - start) / args.steps)
            run[0] = state
    single = min(runs["1 device"][2])
    result = {name: {"ms_per_step": round(1e3 * min(t), 2),
                     "ratio_to_1_device": round(min(t) / single, 3)}
              for name, (_, _, t) in runs.items()}
    print(json.dumps({"devices": jax.device_count(), "backend": jax.default_backend(),
                      "shape": base.shape.to_dict(), "batch": [base.batch_size, base.seq_len],
                      "steps_x_rounds": [args.steps, args.rounds], "best_of_rounds": result},
                     indent=1))


if __name__ == "__main__":
    main()
