"""Where our train step's time goes, by kind of XLA op, at the reference's timing shapes.

Run: python benchmarks/step_profile.py [--width 128] [--steps 5] [--dispatch auto]
in an environment that has `xprof` (pip install xprof; any other: a message and exit 0). Traces
`--steps` steps of `benchmarks/reference_step.py`'s configuration with `jax.profiler`, reads the
trace with xprof's converter and sums each op's self time (its duration less its nested ops') by
kind: dots, the reduce-windows XLA:CPU's tree-reduction rewrite makes of long reductions (norms,
softmax, cross-entropy), copies and transposes, gathers and scatters, other fusions. Printed: the
table, and the dots' rate over the step's active matmul FLOPs, which bounds what removing every
other op could buy (docs/BENCHMARKS.md, "Where the gap to PyTorch is").
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.reference_step import BATCH, SEQ, VOCAB, our_config, our_stepper  # noqa: E402
from benchmarks.run import active_flops_per_token, machine  # noqa: E402
from mssp_jax import dispatch  # noqa: E402

# Host-side spans that enclose the ops rather than being ops.
ENCLOSING = ("$", "Thread", "ThunkExecutor", "Pjit", "CommonPjRt", "ParseArguments", "Handle")
KINDS = (("dot", re.compile(r"^(dot|dot_general)\b")),
         ("reduce-window (tree-reduction rewrite)", re.compile(r"reduce-window")),
         ("gather / scatter", re.compile(r"gather|scatter")),
         ("copy / transpose", re.compile(r"copy|transpose")),
         ("control flow (cond, while)", re.compile(r"^(cond|while|conditional)\b")))


def kind(op_name: str) -> str:
    """The row an HLO op's time goes to."""
    return next((label for label, pattern in KINDS if pattern.search(op_name)),
                "other fusions (elementwise, reductions)")


def self_times(events: list[dict[str, Any]]) -> collections.Counter:
    """Self time (us) per op kind: each complete event's duration less its children's on its
    thread (control-flow ops enclose the ops of their branch)."""
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(ENCLOSING):
            by_thread[(e["pid"], e["tid"])].append(e)
    totals: collections.Counter = collections.Counter()
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[dict[str, Any]] = []
        for e in thread:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                totals[kind(stack[-1]["name"])] -= e["dur"]
            totals[kind(e["name"])] += e["dur"]
            stack.append(e)
    return totals


def trace_events(width: int, steps: int, dispatch_name: str) -> list[dict[str, Any]] | str:
    """The trace of `steps` warm train steps as Chrome trace events, or why not."""
    try:
        convert = importlib.import_module("xprof.convert.raw_to_tool_data")
    except ImportError:
        return "xprof is not installed in this environment"
    tokens = np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ + 1))
    run = our_stepper(width, tokens, dispatch_name)
    run(3)  # compile and warm up outside the trace
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            run(steps)
        planes = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        data, _ = convert.xspace_to_tool_data(planes, "trace_viewer", {})
    return json.loads(data)["traceEvents"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=128, help="d_model")
    parser.add_argument("--steps", type=int, default=5, help="traced train steps")
    parser.add_argument("--dispatch", default="auto", choices=dispatch.names(),
                        help="our MoE dispatch (mssp_jax/dispatch.py)")
    args = parser.parse_args(argv)
    events = trace_events(args.width, args.steps, args.dispatch)
    if isinstance(events, str):
        print(f"step_profile: skipped ({events})")
        return 0
    totals = self_times(events)
    step_ms = sum(totals.values()) / args.steps / 1e3
    flops = active_flops_per_token(our_config(args.width)) * BATCH * SEQ
    dot_ms = totals["dot"] / args.steps / 1e3
    rows = [f"| {label} | {t / args.steps / 1e3:.1f} | {100 * t / sum(totals.values()):.1f}% |"
            for label, t in totals.most_common()]
    print(f"`python benchmarks/step_profile.py --width {args.width} --steps {args.steps} "
          f"--dispatch {args.dispatch}` on {machine()}, load {os.getloadavg()[0]:.1f}\n\n"
          "| op kind | ms/step (self) | share |\n|---|---|---|\n" + "\n".join(rows) +
          f"\n\nops sum to {step_ms:.1f} ms/step; the step's {flops / 1e9:.2f} GFLOP of active "
          f"matmuls over the dots' {dot_ms:.1f} ms: {flops / dot_ms / 1e6:.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
