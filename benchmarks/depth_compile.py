"""Trace + compile time and peak memory of the Transformer-MoE against its depth, unrolled vs
scanned.

Run: python benchmarks/depth_compile.py [--depths 2,4,8,16] [--remat full]

For each depth and each way of building the blocks (unrolled; `scan_layers`; `scan_layers` with
`remat`), a fresh subprocess builds the default Transformer-MoE (configs/transformer_moe.py) at that
depth, initialises its state, compiles its train step and takes one step. Measured there:

* compile: tracing, lowering and compiling the jitted train step (`.lower(...).compile()`), the
  part of the first step that depth may make slow whatever the machine;
* step: running the compiled step once (grows with depth in every variant: it is the model's
  compute);
* peak RSS: the process's maximum resident memory (`getrusage`), initialisation included.

A fresh process per point means no compilation cache or allocator state carries over. Printed: each
point, and per variant the ratios deepest / shallowest (target for the scanned variants: compile
<= 1.3x). The points of one depth run back to back, so load from other processes hits the
variants alike; the ratios still compare runs minutes apart.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def measure(depth: int, fields: dict) -> dict[str, float]:
    """One point, in this process: compile and step seconds, peak RSS in MB."""
    import jax

    from configs import transformer_moe
    from mssp_jax import train

    config = transformer_moe.get_config()
    config.shape.depth = config.base_shape.depth = depth
    config.update(fields)
    program = train.setup(config)
    state = train.init_state(program)
    tokens = jax.random.randint(jax.random.key(0), (config.batch_size, config.seq_len + 1), 0,
                                config.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    jax.block_until_ready(state)
    start = time.perf_counter()
    step = train.make_train_step(program).lower(state, batch).compile()
    compiled = time.perf_counter() - start
    jax.block_until_ready(step(state, batch))
    ran = time.perf_counter() - start - compiled
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    return {"compile_s": compiled, "step_s": ran, "peak_rss_mb": peak_mb}


def in_subprocess(depth: int, fields: dict) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--point", json.dumps([depth, fields])],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depths", default="2,4,8,16", help="comma-separated depths")
    parser.add_argument("--remat", default="full", help="remat policy of the third variant")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # [depth, fields]: one point, as JSON
    args = parser.parse_args(argv)
    if args.point:
        depth, fields = json.loads(args.point)
        print(json.dumps(measure(depth, fields)))
        return 0
    depths = [int(d) for d in args.depths.split(",")]
    variants = {"unrolled": dict(scan_layers=False), "scanned": dict(scan_layers=True),
                "scanned+remat": dict(scan_layers=True, remat=args.remat)}
    results: dict[str, dict[int, dict[str, float]]] = {name: {} for name in variants}
    print("| depth | variant | compile (s) | step (s) | peak RSS (MB) |\n|---|---|---|---|---|")
    for depth in depths:
        for name, fields in variants.items():
            point = results[name][depth] = in_subprocess(depth, fields)
            print(f"| {depth} | {name} | {point['compile_s']:.2f} | {point['step_s']:.2f} | "
                  f"{point['peak_rss_mb']:.0f} |", flush=True)
    low, high = depths[0], depths[-1]
    print(f"\n| variant | depth {high} / depth {low}: compile | step | peak RSS |\n"
          "|---|---|---|---|")
    for name, points in results.items():
        ratio = lambda key: points[high][key] / points[low][key]  # noqa: E731
        print(f"| {name} | {ratio('compile_s'):.2f} | {ratio('step_s'):.2f} | "
              f"{ratio('peak_rss_mb'):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
