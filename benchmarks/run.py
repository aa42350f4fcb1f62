"""Speed of mssp_jax as ratios measured in one run: `python benchmarks/run.py [--quick]`.

Each ratio compares programs timed in the same process, interleaved (A B A B ...) so that the load
of a shared machine hits both alike; a ratio is median(A) / median(B) over the repeats. The table
(with the machine it ran on) is printed and written to docs/BENCHMARKS.md (`--out`).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from configs import mlp_moe, transformer_moe  # noqa: E402
from mssp_jax import compiler, factory, optim, vmap_train  # noqa: E402
from mssp_jax.losses import task_loss  # noqa: E402

Thunk = Callable[[], Any]


class Row(NamedTuple):
    name: str
    ratio: float
    target: str
    detail: str


def interleaved_medians(cases: dict[str, Thunk], repeats: int,
                        warm_up: bool = True) -> dict[str, float]:
    """Median seconds per call of each case over the quiet rounds; one warm-up call each
    (compiles), then rounds A B A B ... The quiet rounds are the faster half of the rounds by
    their total time: on a shared machine a burst of load slows a whole round, and dropping those
    rounds keeps each median to what the programs cost (both sides of a ratio lose the same
    rounds)."""
    for fn in cases.values() if warm_up else ():
        jax.block_until_ready(fn())
    rounds = []
    for _ in range(repeats):
        times = {}
        for name, fn in cases.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name] = time.perf_counter() - start
        rounds.append(times)
    quiet = sorted(rounds, key=lambda r: sum(r.values()))[: (repeats + 1) // 2]
    return {name: statistics.median(r[name] for r in quiet) for name in cases}


def lm_batch(config: Any) -> dict[str, jax.Array]:
    tokens = jax.random.randint(jax.random.key(0), (config.batch_size, config.seq_len + 1), 0,
                                config.vocab_size)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def trainer(model: nnx.Module, tx: optax.GradientTransformation, batch: dict[str, jax.Array],
            steps: int) -> Thunk:
    """A thunk running `steps` jitted train steps (next-token cross-entropy), state carried over;
    compiled as `mssp_jax.train` compiles its steps (`compiler.jit`)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(jnp.copy, nnx.as_pure(params))  # donated below: not the model's arrays

    @functools.partial(compiler.jit, donate_argnums=(0, 1))
    def step(p, opt_state):
        def loss(q):
            outputs, _ = nnx.merge(graphdef, q, rest)(batch["inputs"])
            return task_loss(outputs, batch["targets"], "cross_entropy")

        value, grads = jax.value_and_grad(loss)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, value

    state = [params, tx.init(params)]

    def run():
        for _ in range(steps):
            state[0], state[1], value = step(state[0], state[1])
        return value

    return run


def with_shape(config: Any, **fields: int) -> Any:
    """`config` at another shape; the base shape follows, so every variant is its own base."""
    config = config.copy_and_resolve_references()
    config.shape.update(fields)
    config.base_shape = config.shape.copy_and_resolve_references()
    return config


def default_trainer(config: Any, steps: int, **model_overrides: Any) -> Thunk:
    """The train step of `config` with its own optimizer chain (factory.build_optimizer)."""
    config = config.copy_and_resolve_references()
    config.update(model_overrides)
    scaling = factory.validate(config)
    model = factory.build_model(config, nnx.Rngs(0), scaling)
    return trainer(model, factory.build_optimizer(config, scaling, model), lm_batch(config), steps)


def dense_ffn_config(config: Any) -> Any:
    """The same Transformer with a dense FFN of width K * N_e (the MoE's active width) in every
    block: moe_every beyond the depth means no block is an MoE block."""
    dense = config.copy_and_resolve_references()
    dense.moe_every = config.shape.depth + 1
    dense.ffn_width = config.shape.top_k * config.shape.expert_width
    return dense


def moe_vs_dense(config: Any, steps: int, repeats: int, cases: dict[str, Thunk]) -> list[Row]:
    """MoE train step (`cases`: dispatch name -> `steps` steps) / dense-FFN train step."""
    names = list(cases)
    cases["ffn"] = default_trainer(dense_ffn_config(config), steps)
    t = interleaved_medians(cases, repeats)
    target = {"auto": "<= 1.10"}
    return [Row(f"MoE / dense-FFN train step, dispatch={name}", t[name] / t["ffn"],
                target.get(name, "-"),
                f"{t[name] / steps * 1e3:.1f} / {t['ffn'] / steps * 1e3:.1f} ms")
            for name in names]


def experts_64_vs_8(config: Any, steps: int, repeats: int) -> Row:
    """Cost independence of M: same N, N_e, K and tokens, M = 64 vs M = 8."""
    cases = {m: default_trainer(with_shape(config, num_experts=m), steps) for m in (64, 8)}
    t = interleaved_medians(cases, repeats)
    return Row("train step M=64 / M=8 (same K, N_e, N)", t[64] / t[8], "<= 1.15",
               f"{t[64] / steps * 1e3:.1f} / {t[8] / steps * 1e3:.1f} ms")


def adam_vs_optax(config: Any, steps: int, repeats: int) -> list[Row]:
    """Our per-role AdamW chain / optax.adamw: the whole train step, and the update alone."""
    scaling = factory.validate(config)
    opt = config.optimizer
    model = factory.build_model(config, nnx.Rngs(0), scaling)
    hyper = dict(b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
    chains = {"ours": optim.adamw(opt.learning_rate, scaling, model, **hyper),
              "optax": optax.adamw(opt.learning_rate, **hyper, mask=optim.decay_mask)}
    batch = lm_batch(config)
    t = interleaved_medians({k: trainer(model, tx, batch, steps) for k, tx in chains.items()},
                            repeats)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    grads = jax.tree.map(jnp.ones_like, params)

    def updater(tx):
        update = compiler.jit(tx.update)
        state = tx.init(params)
        return lambda: [update(grads, state, params) for _ in range(steps)][-1]

    u = interleaved_medians({k: updater(tx) for k, tx in chains.items()}, repeats)
    return [Row("our AdamW chain / optax.adamw, train step", t["ours"] / t["optax"], "<= 1.02",
                f"{t['ours'] / steps * 1e3:.2f} / {t['optax'] / steps * 1e3:.2f} ms"),
            Row("our AdamW chain / optax.adamw, update only", u["ours"] / u["optax"], "-",
                f"{u['ours'] / steps * 1e3:.3f} / {u['optax'] / steps * 1e3:.3f} ms")]


def sweep_vs_sequential(config: Any, num_lrs: int, repeats: int) -> Row:
    """Wall-clock of `num_lrs` LRs as one vmapped sweep (`vmap_train.train_lrs`) vs one
    `train_lrs` call per LR; end to end, so each call's trace and compile is included."""
    keys = jax.random.split(jax.random.key(0), 2)
    rows = config.steps * config.batch_size
    split = {"inputs": jax.random.normal(keys[0], (rows, config.input_dim)),
             "targets": jax.random.randint(keys[1], (rows,), 0, config.num_classes)}
    data = {"train": split, "eval": split}
    lrs = [float(lr) for lr in jnp.geomspace(1e-3, 1e-1, num_lrs)]
    m = interleaved_medians(
        {"vmap": lambda: vmap_train.train_lrs(config, lrs, [0], data).eval_loss,
         "sequential": lambda: [vmap_train.train_lrs(config, [lr], [0], data).eval_loss
                                for lr in lrs]}, repeats, warm_up=False)
    return Row(f"{num_lrs} sequential runs / {num_lrs}-LR vmapped sweep (wall-clock)",
               m["sequential"] / m["vmap"], ">= 3",
               f"{m['sequential']:.1f} / {m['vmap']:.1f} s, {config.steps} steps, MLP-MoE "
               f"N={config.shape.width} M={config.shape.num_experts}, compiles included")


def active_flops_per_token(config: Any) -> float:
    """Train-step FLOPs per token of the Transformer-MoE (3 x forward; matmuls only, attention
    scores counted without the causal half, as in the usual 6P + 12 L T N rule)."""
    s, seq = config.shape, config.seq_len
    per_layer = 4 * s.width ** 2 + s.width * s.num_experts + s.top_k * 2 * s.width * s.expert_width
    forward = 2 * (s.depth * per_layer + s.width * config.vocab_size) + s.depth * 4 * seq * s.width
    return 3 * forward


def flops_utilisation(config: Any, train: Thunk, steps: int, repeats: int, size: int) -> Row:
    """Achieved FLOP/s of the default train step (`train`: `steps` steps of `config`) / this
    machine's f32 matmul FLOP/s."""
    a = jax.random.normal(jax.random.key(0), (size, size))
    matmul = jax.jit(lambda x: x @ x)
    t = interleaved_medians({"train": train, "matmul": lambda: matmul(a)}, repeats)
    tokens = config.batch_size * config.seq_len
    achieved = active_flops_per_token(config) * tokens * steps / t["train"]
    peak = 2 * size ** 3 / t["matmul"]
    return Row("default Transformer-MoE train step FLOP/s / matmul FLOP/s", achieved / peak, "-",
               f"{achieved / 1e9:.1f} / {peak / 1e9:.1f} GFLOP/s (matmul {size}^3)")


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    return (f"{os.cpu_count()} CPU cores ({cpu}), backend {jax.default_backend()}, "
            f"jax {jax.__version__}, optax {optax.__version__}, commit {commit}")


def load() -> str:
    """The 1, 5 and 15 minute load averages (2 cores: above 2 means others share them)."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def table(rows: list[Row]) -> str:
    lines = ["| ratio | measured | target | medians (A / B) |", "|---|---|---|---|"]
    # two decimals, or two significant digits below 0.1 (a loaded machine's tiny ratios not 0.00)
    lines += [f"| {r.name} | {r.ratio:{'.2f' if r.ratio >= 0.1 else '.2g'}} | {r.target} | "
              f"{r.detail} |" for r in rows]
    return "\n".join(lines)


def write_markdown(path: Path, text: str) -> None:
    """Replaces the generated section of `path` (between the markers), keeping the prose."""
    begin, end = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
    block = f"{begin}\n{text}\n{end}"
    old = path.read_text() if path.exists() else f"# Benchmarks\n\n{begin}\n{end}\n"
    if begin not in old:
        old += f"\n{begin}\n{end}\n"
    head, rest = old.split(begin, 1)
    path.write_text(head + block + rest.split(end, 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (<1 min)")
    parser.add_argument("--repeats", type=int, default=0, help="interleaved repeats (0 = mode's)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"),
                        help="markdown file whose generated table is replaced ('' = none; "
                             "never with --only)")
    parser.add_argument("--only", default="", metavar="NAME",
                        help="run one benchmark and print its rows: moe_vs_dense, experts, adam, "
                             "sweep or flops")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 15)  # the sweep row: a fifth (each compiles)
    steps = 1 if args.quick else 5
    lm = transformer_moe.get_config()
    mlp = mlp_moe.get_config()
    mlp.steps = 2 if args.quick else 100
    if args.quick:  # the programs at toy sizes: checks the table, not the targets
        lm.batch_size, lm.seq_len = 2, 16
        lm.shape.depth = lm.base_shape.depth = 1
        # Dense dispatch compiles fastest; the MoE / dense-FFN rows still name theirs (auto).
        lm.dispatch = mlp.dispatch = "dense"
    started = time.perf_counter()
    dispatches = ["auto"] if args.quick else ["auto", "sorted", "capacity", "ragged", "dense"]
    benchmarks = {
        "moe_vs_dense": lambda: moe_vs_dense(
            lm, steps, repeats, {name: default_trainer(lm, steps, dispatch=name)
                                 for name in dispatches}),
        "experts": lambda: [experts_64_vs_8(lm, steps, repeats)],
        "adam": lambda: adam_vs_optax(lm, steps, repeats),
        "sweep": lambda: [sweep_vs_sequential(mlp, 2 if args.quick else 8,
                                              max(repeats // 5, 1))],
        "flops": lambda: [flops_utilisation(lm, default_trainer(lm, steps), steps, repeats,
                                            256 if args.quick else 1024)],
    }
    if args.only and args.only not in benchmarks:
        parser.error(f"--only must be one of {list(benchmarks)}, got {args.only!r}")
    rows = [row for name, rows_of in benchmarks.items() if args.only in ("", name)
            for row in rows_of()]
    mode = ("--quick " if args.quick else "") + (f"--only {args.only} " if args.only else "")
    text = (f"`python benchmarks/run.py {mode}--repeats {repeats}` on {machine()}, load {load()}; "
            f"{time.perf_counter() - started:.0f} s.\n\n{table(rows)}")
    print(text)
    if args.out and not args.only:
        write_markdown(Path(args.out), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
