"""Our Transformer-MoE train step beside the authors' PyTorch one, at the reference's timing shapes.

Run: python benchmarks/reference_step.py PATH [--widths 128 256] [--rounds 7] [--steps 3]
with PATH a checkout of github.com/vankadara-lab/mssp-moe, in an environment that also has torch
(any other: a message and exit 0). The reference is imported in place from
PATH/transformer-moe-experiments (model.py: GPT, GPTConfig, configure_optimizers); nothing of it
lives in this repository.

Shapes (both sides): 4 blocks, MoE in every block, 8 experts, top-2 with sigmoid gates, expert
width 256, head dim 16, sequence 128, batch 16, vocab 256, d_model in --widths; AdamW, gradient
clipping at 1.0, load-balancing loss on. The reference's step is its train.py's inner step
(forward, backward, clip, AdamW step, zero grads), timed with PyTorch on 2 threads and on 1: on a
machine shared with other processes PyTorch's OpenMP threads wait on each other (2 threads
measured 3x slower than 1 there), so the ratio is taken against the faster of the two. Ours is
`mssp_jax.train.make_train_step` (what `run.py train` runs). Rounds alternate ours / reference
on 2 threads / on 1 / a 1024^3 f32 matmul in jnp, so load from other processes hits all alike;
figures are medians over the quiet half of the rounds (`benchmarks.run.interleaved_medians`).
Printed: tokens/s of each and their ratio, and our train step's FLOP/s (active matmul FLOPs,
`benchmarks.run.active_flops_per_token`) over the matmul's.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.run import (active_flops_per_token, interleaved_medians, machine,  # noqa: E402
                            with_shape)
from configs import transformer_moe  # noqa: E402
from mssp_jax import dispatch, train  # noqa: E402

LAYERS, EXPERTS, TOP_K, EXPERT_WIDTH, HEAD_DIM = 4, 8, 2, 256, 16
SEQ, BATCH, VOCAB, TORCH_THREADS = 128, 16, 256, (2, 1)
REFERENCE_DIR = "transformer-moe-experiments"


def our_config(width: int, dispatch_name: str = "auto") -> Any:
    """configs/transformer_moe.py at the timing shapes (its own base shape: constants 1)."""
    config = with_shape(transformer_moe.get_config(), width=width, expert_width=EXPERT_WIDTH,
                        num_experts=EXPERTS, top_k=TOP_K, depth=LAYERS)
    config.batch_size, config.seq_len, config.dispatch = BATCH, SEQ, dispatch_name
    config.vocab_size, config.head_dim = VOCAB, HEAD_DIM
    return config


def our_stepper(width: int, tokens: np.ndarray, dispatch_name: str) -> Callable[[int], None]:
    """`steps` -> runs that many of our train steps (state carried over) and waits for them."""
    program = train.setup(our_config(width, dispatch_name))
    step = train.make_train_step(program)
    batch = program.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    state = [train.init_state(program)]

    def run(steps: int) -> None:
        for _ in range(steps):
            state[0], out = step(state[0], batch)
        jax.block_until_ready(out["loss"])

    return run


def reference_stepper(ref: Any, torch: Any, width: int,
                      tokens: np.ndarray) -> Callable[[int], None]:
    """The reference's GPT at the same shapes and its train.py step, on CPU."""
    config = ref.model.GPTConfig(
        sequence_length=SEQ, vocab_size=VOCAB, n_layer=LAYERS, n_head=width // HEAD_DIM,
        n_embd=width, n_exp=EXPERTS, top_k=TOP_K, moe_ratio=EXPERT_WIDTH / width, stride=1,
        routing_fn="sigmoid", use_aux_loss=True, drop_tokens=False)
    torch.manual_seed(0)
    model = ref.model.GPT(config)
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3,
                                           betas=(0.9, 0.95), device_type="cpu")
    x = torch.from_numpy(tokens[:, :-1].astype(np.int64))
    y = torch.from_numpy(tokens[:, 1:].astype(np.int64))
    manager = ref.manager.MANAGER

    def run(steps: int) -> None:
        for _ in range(steps):
            for reset in ("reset_expert_stats", "reset_output_l2", "reset_router_weight_extremes",
                          "reset_sigmoid_ratio"):
                getattr(manager, reset)()
            _, _, loss, _, _ = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def import_reference(path: Path) -> tuple[Any, Any] | str:
    """(namespace with the reference's `model` and `manager` modules, torch), or why not."""
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return "torch is not installed in this environment"
    source = path / REFERENCE_DIR
    if not (source / "model.py").is_file():
        return f"{source}/model.py not found: PATH must be a checkout of vankadara-lab/mssp-moe"
    sys.path.append(str(source))
    return argparse.Namespace(model=importlib.import_module("model"),
                              manager=importlib.import_module("manager")), torch


def compare(ref: Any, torch: Any, width: int, steps: int, rounds: int,
            dispatch_name: str) -> str:
    """One table row: our and the reference's ms/step and tokens/s, and our FLOP/s fraction."""
    tokens = np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ + 1))
    ours = our_stepper(width, tokens, dispatch_name)
    theirs = reference_stepper(ref, torch, width, tokens)
    a = jax.random.normal(jax.random.key(0), (1024, 1024))
    matmul = jax.jit(lambda m: m @ m)
    cases = {"ours": lambda: ours(steps),
             **{f"reference {n}": lambda n=n: (torch.set_num_threads(n), theirs(steps))
                for n in TORCH_THREADS},
             "matmul": lambda: jax.block_until_ready(matmul(a))}
    t = interleaved_medians(cases, rounds)  # after a warm-up call each (compiles, allocations)
    ms = {name: t[name] / steps * 1e3 for name in cases if name != "matmul"}
    per_thread_count = [ms[f"reference {n}"] for n in TORCH_THREADS]
    ms["reference"] = min(per_thread_count)
    achieved = active_flops_per_token(our_config(width)) * BATCH * SEQ * steps / t["ours"]
    peak = 2 * 1024 ** 3 / t["matmul"]
    return (f"| {width} | {ms['ours']:.0f} | {' / '.join(f'{m:.0f}' for m in per_thread_count)} | "
            f"{BATCH * SEQ / ms['ours'] * 1e3:.0f} | {BATCH * SEQ / ms['reference'] * 1e3:.0f} | "
            f"**{ms['reference'] / ms['ours']:.2f}** | {achieved / 1e9:.1f} / {peak / 1e9:.1f} = "
            f"**{achieved / peak:.2f}** | {os.getloadavg()[0]:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="checkout of github.com/vankadara-lab/mssp-moe")
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 256], help="d_model values")
    parser.add_argument("--steps", type=int, default=3, help="train steps per timed call")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per width")
    parser.add_argument("--dispatch", default="auto", choices=dispatch.names(),
                        help="our MoE dispatch (mssp_jax/dispatch.py)")
    args = parser.parse_args(argv)
    imported = import_reference(args.path)
    if isinstance(imported, str):
        print(f"reference_step: skipped ({imported})")
        return 0
    ref, torch = imported
    rows = [compare(ref, torch, width, args.steps, args.rounds, args.dispatch)
            for width in args.widths]
    print(f"`python benchmarks/reference_step.py PATH --steps {args.steps} --rounds {args.rounds} "
          f"--dispatch {args.dispatch}` "
          f"on {machine()}, torch {torch.__version__}\n\n"
          "| d_model | ours ms/step | reference ms/step, 2 / 1 threads | ours tokens/s | "
          "reference tokens/s (faster) | ours / reference tokens/s | "
          "our GFLOP/s / 1024^3 matmul GFLOP/s | load (1 min) |\n"
          "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
