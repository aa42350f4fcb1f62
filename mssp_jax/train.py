"""The training loop behind `run.py train` / `run.py eval`.

`setup(config)` validates the config (before any compute) and builds everything but arrays: the
model's graph and the Optax chain. `init_state`, `make_train_step` and `make_eval_step` take that
`Program`; the state is the pytree ``{'params', 'opt_state'}`` (params as a pure `nnx.State`), the
layout `mssp_jax.sharding` shards, so a mesh replaces these three functions without touching the
loop. `main` runs the loop: periodic eval, checkpoints (resumed exactly on restart), metrics, and a
clean stop on a non-finite loss.

Workdir outputs: metrics.jsonl, tensorboard/, checkpoints/, loss_curve.png, config.json and, after a
divergence, divergence.json. Exit status: 0 done, 3 diverged (run.py returns 2 on config errors).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
import optax
from flax import nnx

from mssp_jax import checkpoint, data, factory, losses, metrics
from mssp_jax.scaling import ConfigError, Scaling

DIVERGED = 3
DIVERGENCE_FILE = "divergence.json"
MODES = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Program:
    """What the steps close over: config, resolved scaling, model graph and optimizer."""

    config: Any
    scaling: Scaling
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule


def validate(config: Any) -> Scaling:
    """Model, parameterization, data and loop fields; raises ConfigError naming the field."""
    scaling = factory.validate(config)
    for field in ("steps", "batch_size"):
        if not isinstance(config[field], int) or config[field] < 1:
            raise ConfigError(f"{field} must be a positive integer, got {config[field]!r}")
    for field in ("eval_every", "eval_steps", "checkpoint_every", "log_every"):
        if not isinstance(config[field], int) or config[field] < 0:
            raise ConfigError(f"{field} must be an integer >= 0 (0 = off / full pass), "
                              f"got {config[field]!r}")
    if not isinstance(config.keep_checkpoints, int) or config.keep_checkpoints < 1:
        raise ConfigError(f"keep_checkpoints must be a positive integer, got {config.keep_checkpoints!r}")
    data.validate(config)
    return scaling


def setup(config: Any) -> Program:
    """Validates `config` and builds the graph and optimizer (no arrays are allocated)."""
    scaling = validate(config)
    model = nnx.eval_shape(lambda: factory.build_model(config, nnx.Rngs(config.seed), scaling))
    graphdef, _ = nnx.split(model, nnx.Param)
    tx = factory.build_optimizer(config, scaling, model)
    return Program(config, scaling, graphdef, tx, factory.build_schedule(config))


def init_state(program: Program) -> dict[str, Any]:
    """Initial ``{'params', 'opt_state'}`` from `config.seed` (one compiled program, not one
    per initialiser)."""

    def init():
        model = factory.build_model(program.config, nnx.Rngs(program.config.seed), program.scaling)
        params = nnx.as_pure(nnx.state(model, nnx.Param))
        return {"params": params, "opt_state": program.tx.init(params)}

    return jax.jit(init)()


def make_train_step(program: Program) -> Callable:
    """jit(state, batch) -> (state, metrics): one optimizer step, state donated."""

    def step(state, batch):
        def objective(params):
            return losses.loss_fn(nnx.merge(program.graphdef, params), batch, program.config)

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        updates, opt_state = program.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return ({"params": params, "opt_state": opt_state},
                {"loss": loss, "grad_norm": optax.global_norm(grads), **aux})

    return jax.jit(step, donate_argnums=0)


def make_eval_step(program: Program) -> Callable:
    """jit(params, batch) -> metrics (loss and router metrics)."""

    def step(params, batch):
        loss, aux = losses.loss_fn(nnx.merge(program.graphdef, params), batch, program.config)
        return {"loss": loss, **aux}

    return jax.jit(step)


def step_builders(program: Program) -> tuple[Callable, Callable, Callable]:
    """`init_state`, `make_train_step`, `make_eval_step`, or their sharded versions when
    ``config.mesh`` spans more than one device (`mssp_jax.sharding`; same state layout)."""
    from mssp_jax import sharding

    if not sharding.uses_mesh(program.config):
        return init_state, make_train_step, make_eval_step
    return sharding.step_builders(program.config)


def evaluate(eval_step: Callable, params: Any, examples: data.Examples, config: Any) -> dict:
    """Mean metrics over `eval_steps` batches of the eval split in its stored order (the same
    batches at every evaluation; 0 = one full pass, the remainder dropped)."""
    batches = data.Batches(examples, config.batch_size, config.seed, shuffle=False)
    count = config.eval_steps or max(examples.num // config.batch_size, 1)
    results = [eval_step(params, next(batches)) for _ in range(count)]
    return jax.tree.map(lambda *xs: np.mean(np.stack(xs)), *results)


def _record_divergence(workdir: Path, step: int, loss: float, last_finite: tuple[int, float] | None):
    record = {"step": step, "loss": repr(loss), "last_finite_step": last_finite and last_finite[0],
              "last_finite_loss": last_finite and last_finite[1]}
    if jax.process_index() == 0:
        (workdir / DIVERGENCE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    print(f"\ndiverged: loss {loss} at step {step} (last finite: {last_finite}); "
          f"recorded in {workdir / DIVERGENCE_FILE}")


def train(program: Program, workdir: Path) -> int:
    """Trains to `config.steps`, resuming from the workdir's latest checkpoint."""
    config = program.config
    train_examples = data.load(config, config.data.train_split)
    eval_examples = data.load(config, config.data.eval_split)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", config.checkpoint_every,
                                   config.keep_checkpoints)
    init, make_train, make_eval = step_builders(program)
    state, start, position = init(program), 0, 0
    restored = ckpt.restore_latest(state, config.seed)
    if restored:
        state, start, position = restored.state, restored.step, restored.data_position
        print(f"resumed from step {start} ({workdir / 'checkpoints'})")
    batches = data.Batches(train_examples, config.batch_size, config.seed, position=position)
    train_step, eval_step = make_train(program), make_eval(program)
    writer = metrics.Writer(workdir, config.steps)
    status, last_finite, record = 0, None, {}
    for step in range(start + 1, config.steps + 1):
        batch = next(batches)
        state, step_metrics = train_step(state, batch)
        loss = float(step_metrics["loss"])
        if not math.isfinite(loss):
            _record_divergence(workdir, step, loss, last_finite)
            status = DIVERGED
            break
        last_finite = (step, loss)
        if step == start + 1:  # rates from here on exclude compilation
            writer.rates(step, 0)
        if step % max(config.log_every, 1) == 0 or step == config.steps:
            rates = writer.rates(step, int(np.prod(batch["targets"].shape)))
            record = writer.write("train", step, {**step_metrics, **rates,
                                                  "lr": program.schedule(step - 1)})
            writer.progress(step, record)
        if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
            writer.write("eval", step, evaluate(eval_step, state["params"], eval_examples, config))
        ckpt.save(step, state, batches.position, config.seed, force=step == config.steps)
    ckpt.close()
    writer.close()
    if jax.process_index() == 0:
        curve = metrics.plot_loss_curve(workdir)
        final = metrics.read(workdir, "eval") or metrics.read(workdir, "train")
        if final:
            last = list(final)[-1]
            print(f"final loss {final[last]['loss']:.4f} at step {last}")
        print(f"outputs in {workdir}: {metrics.METRICS_FILE}, tensorboard/, checkpoints/, "
              f"{curve.name}")
    return status


def run_eval(program: Program, workdir: Path) -> int:
    """Evaluates the latest checkpoint (the initial parameters if there is none)."""
    config = program.config
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", config.checkpoint_every,
                                   config.keep_checkpoints)
    init, _, make_eval = step_builders(program)
    state, step = init(program), 0
    restored = ckpt.restore_latest(state, config.seed)
    if restored:
        state, step = restored.state, restored.step
    else:
        print(f"no checkpoint in {workdir / 'checkpoints'}: evaluating the initial parameters")
    ckpt.close()
    examples = data.load(config, config.data.eval_split)
    results = evaluate(make_eval(program), state["params"], examples, config)
    writer = metrics.Writer(workdir, config.steps)
    record = writer.write("eval", step, results)
    writer.close()
    print(json.dumps({"step": step, **record}, indent=1))
    return 0


def main(mode: str, config: Any, workdir: str) -> int:
    """`run.py train|eval`: validates, then trains or evaluates in `workdir`."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {list(MODES)}, got {mode!r}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from mssp_jax import sharding

    sharding.initialize_distributed(config)  # multi-host: before any other JAX call
    program = setup(config)
    path = Path(workdir)
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(config.to_json_best_effort(indent=1) + "\n")
    return train(program, path) if mode == "train" else run_eval(program, path)
