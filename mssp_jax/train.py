"""The training loop behind `run.py train` / `run.py eval`, on a device mesh (one device is the
trivial mesh: the same code runs on a laptop and on a TPU pod).

`setup(config)` validates the config (before any compute) and builds everything but arrays: the
mesh, the model's graph (its MoE layers routing tokens on the mesh), the Optax
chain and the sharding of every state leaf. `init_state`, `make_train_step` and `make_eval_step`
take that `Program`; the state is the pytree ``{'params', 'opt_state'}`` (params as a pure
`nnx.State`). `train` runs the loop: periodic eval, checkpoints (resumed exactly on restart),
metrics, a clean stop on a non-finite loss or on SIGTERM / SIGINT.

The loop does not wait for the device every step: the per-step metrics stay on the device and
are fetched together every `log_every` steps (and before every evaluation and checkpoint), so a
non-finite loss is found within `log_every` steps and reported at the first step that had one;
no checkpoint is written before the steps it holds have been checked.

Workdir outputs: metrics.jsonl, tensorboard/, checkpoints/, loss_curve.png, config.json and, after a
divergence, divergence.json. Exit status: 0 done, 3 diverged, 4 interrupted by SIGTERM / SIGINT
(checkpoint saved; the same command resumes); run.py returns 2 on config errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mssp_jax import checkpoint, compiler, data, factory, losses, metrics, preemption, sharding
from mssp_jax.scaling import ConfigError, Scaling

DONE, DIVERGED, INTERRUPTED = 0, 3, 4
DIVERGENCE_FILE = "divergence.json"
MODES = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Program:
    """What the steps close over: config, resolved scaling, mesh, model graph and optimizer, and
    the abstract state (ShapeDtypeStructs carrying their shardings; also the restore target of
    `checkpoint.Checkpointer`)."""

    config: Any
    scaling: Scaling
    mesh: Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: Any

    @property
    def state_shardings(self) -> Any:
        return jax.tree.map(lambda a: a.sharding, self.abstract_state)

    @property
    def batch_sharding(self) -> NamedSharding:
        return sharding.data_sharding(self.mesh)

    def global_batch(self, local_batch: Any) -> Any:
        """This process's batch (numpy, `data.Batches`) as global arrays on the mesh."""
        return sharding.global_batch(local_batch, self.batch_sharding)


def validate(config: Any) -> Scaling:
    """Model, parameterization, data, loop and mesh fields; raises ConfigError naming the field."""
    scaling = factory.validate(config)
    for field in ("steps", "batch_size"):
        if not isinstance(config[field], int) or config[field] < 1:
            raise ConfigError(f"{field} must be a positive integer, got {config[field]!r}")
    for field in ("eval_every", "eval_steps", "checkpoint_every", "log_every"):
        if not isinstance(config[field], int) or config[field] < 0:
            raise ConfigError(f"{field} must be an integer >= 0 (0 = off / full pass), "
                              f"got {config[field]!r}")
    if not isinstance(config.keep_checkpoints, int) or config.keep_checkpoints < 1:
        raise ConfigError("keep_checkpoints must be a positive integer, "
                          f"got {config.keep_checkpoints!r}")
    data.validate(config)
    return scaling


def _new_state(config: Any, scaling: Scaling, tx: optax.GradientTransformation) -> dict[str, Any]:
    model = factory.build_model(config, nnx.Rngs(config.seed), scaling)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    return {"params": params, "opt_state": tx.init(params)}


def setup(config: Any, mesh: Mesh | None = None) -> Program:
    """Validates `config` and lays the run out on `mesh` (default: ``config.mesh``); no arrays
    are allocated."""
    scaling = validate(config)
    mesh = sharding.make_mesh(config) if mesh is None else mesh
    sharding.validate_mesh(config, dict(mesh.shape))
    model = nnx.eval_shape(lambda: factory.build_model(config, nnx.Rngs(config.seed), scaling))
    dropless = config.get("dispatch", "auto") != "capacity"
    sharding.use_mesh_dispatch(model, mesh, 0.0 if dropless else config.capacity_factor)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = factory.build_optimizer(config, scaling, model)
    shapes = jax.eval_shape(lambda: _new_state(config, scaling, tx))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            shapes, sharding.state_shardings(tx, params, mesh))
    return Program(config, scaling, mesh, graphdef, tx, factory.build_schedule(config), abstract)


def init_state(program: Program) -> dict[str, Any]:
    """The initial ``{'params', 'opt_state'}`` from `config.seed`, created directly sharded (one
    compiled program; the same values on every mesh)."""
    return jax.jit(lambda: _new_state(program.config, program.scaling, program.tx),
                   out_shardings=program.state_shardings)()


def _objective(program: Program, params: Any, batch: Any) -> tuple[jax.Array, dict]:
    with sharding.activation_rules(program.mesh):
        return losses.loss_fn(nnx.merge(program.graphdef, params), batch, program.config)


def make_train_step(program: Program) -> Callable:
    """jit(state, global batch) -> (state, metrics): one optimizer step with the state's
    shardings, state donated, compiled with `compiler.options()`. The metrics stay on the
    device (nothing waits for them)."""

    def step(state, batch):
        (loss, aux), grads = jax.value_and_grad(
            lambda p: _objective(program, p, batch), has_aux=True)(state["params"])
        updates, opt_state = program.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return ({"params": params, "opt_state": opt_state},
                {"loss": loss, "grad_norm": optax.global_norm(grads), **aux})

    return compiler.jit(step, in_shardings=(program.state_shardings, program.batch_sharding),
                        out_shardings=(program.state_shardings, NamedSharding(program.mesh, P())),
                        donate_argnums=0)


def make_eval_step(program: Program) -> Callable:
    """jit(params, global batch) -> metrics (loss, router metrics, accuracy for classifiers)."""

    def step(params, batch):
        loss, aux = _objective(program, params, batch)
        return {"loss": loss, **aux}

    return compiler.jit(step,
                        in_shardings=(program.state_shardings["params"], program.batch_sharding),
                        out_shardings=NamedSharding(program.mesh, P()))


def evaluate(program: Program, eval_step: Callable, params: Any, examples: data.Examples) -> dict:
    """Mean metrics over `eval_steps` batches of the eval split in its stored order (the same
    batches at every evaluation; 0 = one full pass, the remainder dropped)."""
    config = program.config
    batches = data.Batches(examples, config.batch_size, config.seed, shuffle=False)
    count = config.eval_steps or max(examples.num // config.batch_size, 1)
    results = [eval_step(params, program.global_batch(next(batches))) for _ in range(count)]
    return jax.tree.map(lambda *xs: np.mean(np.stack(xs)), *jax.device_get(results))


def throughput(config: Any) -> metrics.Throughput:
    """Tokens/s for the language model, examples/s for the classifiers (global batch)."""
    if config.model == "transformer_moe":
        return metrics.Throughput(config.batch_size * config.seq_len, "tokens")
    return metrics.Throughput(config.batch_size, "examples")


def run_title(model: str, scaling: Scaling) -> str:
    """Model, parameterization, regime and scale (width over the base width), for the loss curve."""
    s, b = scaling.shape, scaling.base
    return (f"{model}, {scaling.name}, regime {scaling.regime}, scale {s.N / b.N:g} "
            f"(N={s.N}, N_e={s.Ne}, M={s.M}, K={s.K}, L={s.L})")


def final_line(kind: str, step: int, record: dict[str, float]) -> str:
    """The last line of a run: which loss it is, its value (and accuracy) and its step."""
    accuracy = f", accuracy {record['accuracy']:.4f}" if "accuracy" in record else ""
    return f"final {kind} loss {record['loss']:.4f}{accuracy} at step {step}"


class DivergenceWatch:
    """Checks fetched per-step losses in order; remembers the last finite one."""

    def __init__(self):
        self.last_finite: tuple[int, float] | None = None

    def first_bad(self, losses: list[tuple[int, Any]]) -> tuple[int, float] | None:
        """The first (step, loss) that is not finite, or None."""
        for step, loss in losses:
            loss = float(loss)
            if not math.isfinite(loss):
                return step, loss
            self.last_finite = (step, loss)
        return None

    def record(self, workdir: Path, bad: tuple[int, float], stopped_at: int) -> str:
        """Writes divergence.json (process 0); returns the message."""
        last = self.last_finite
        record = {"step": bad[0], "loss": repr(bad[1]), "last_finite_step": last and last[0],
                  "last_finite_loss": last and last[1], "stopped_at_step": stopped_at}
        if jax.process_index() == 0:
            (workdir / DIVERGENCE_FILE).write_text(json.dumps(record, indent=1) + "\n")
        before = f"step {last[0]}, loss {last[1]:.4f}" if last else "none"
        return (f"diverged: loss {bad[1]} at step {bad[0]} (last finite: {before}; found at step "
                f"{stopped_at}); recorded in {workdir / DIVERGENCE_FILE}")


def train(program: Program, workdir: Path) -> int:
    """Trains to `config.steps`, resuming from the workdir's latest checkpoint; returns the exit
    status (DONE, DIVERGED or INTERRUPTED)."""
    config = program.config
    with preemption.StopSignals() as stop:
        train_examples = data.load(config, config.data.train_split)
        eval_examples = data.load(config, config.data.eval_split)
        ckpt = checkpoint.Checkpointer(workdir / "checkpoints", config.checkpoint_every,
                                       config.keep_checkpoints)
        state, start, position = _restore_or_init(program, ckpt, workdir)
        batches = data.Batches(train_examples, config.batch_size, config.seed, position=position)
        train_step, eval_step = make_train_step(program), make_eval_step(program)
        writer = metrics.Writer(workdir, config.steps, resume_from=start)
        rates, watch = throughput(config), DivergenceWatch()
        status, message, pending = DONE, "", []
        for step in range(start + 1, config.steps + 1):
            state, step_metrics = train_step(state, program.global_batch(next(batches)))
            pending.append((step, step_metrics))
            stopping, last = stop.reached(step), step == config.steps
            log = step % max(config.log_every, 1) == 0 or last
            evaluating = bool(config.eval_every) and (step % config.eval_every == 0 or last)
            saving = ckpt.due(step) or last or stopping
            if not (log or evaluating or saving or step == start + 1):
                continue
            fetched, pending = jax.device_get(pending), []  # waits for the steps in flight
            bad = watch.first_bad([(s, m["loss"]) for s, m in fetched])
            if bad:
                status, message = DIVERGED, watch.record(workdir, bad, step)
                break
            if step == start + 1:  # rates from here on exclude compilation
                rates.start(step)
            if log:
                record = writer.write("train", step, {**fetched[-1][1], **rates.rates(step),
                                                      "lr": program.schedule(step - 1)})
                writer.progress(step, record)
            with rates.pause():
                if evaluating:
                    results = evaluate(program, eval_step, state["params"], eval_examples)
                    writer.report("eval", step, writer.write("eval", step, results))
                if saving:
                    ckpt.save(step, state, batches.position, config.seed)
            if stopping:
                status = INTERRUPTED
                message = (f"stopped by {stop.describe()} at step {step}: checkpoint saved in "
                           f"{workdir / 'checkpoints'}; run the same command to resume")
                break
        ckpt.close()
        writer.close()
        _report_end(program, workdir, status, message)
    return status


def _restore_or_init(program: Program, ckpt: checkpoint.Checkpointer,
                     workdir: Path) -> tuple[Any, int, int]:
    """(state, step, data position) of the latest checkpoint, or of a fresh start."""
    restored = ckpt.restore_latest(program.abstract_state, program.config.seed)
    if not restored:
        return init_state(program), 0, 0
    print(f"resumed from step {restored.step} ({workdir / 'checkpoints'})")
    return restored.state, restored.step, restored.data_position


def _report_end(program: Program, workdir: Path, status: int, message: str) -> None:
    """Loss curve and where the outputs are (process 0), then how the run ended: the final loss,
    or `message` (divergence, interruption; every process)."""
    if jax.process_index() == 0:
        curve = metrics.plot_loss_curve(workdir, run_title(program.config.model, program.scaling))
        print(f"outputs in {workdir}: {metrics.METRICS_FILE}, tensorboard/, checkpoints/, "
              f"{curve.name}")
        kind = "eval" if metrics.read(workdir, "eval") else "train"
        records = metrics.read(workdir, kind)
        if status == DONE and records:
            message = final_line(kind, *list(records.items())[-1])
    if message:
        print(message, flush=True)


def run_eval(program: Program, workdir: Path) -> int:
    """Evaluates the latest checkpoint (the initial parameters if there is none)."""
    config = program.config
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", config.checkpoint_every,
                                   config.keep_checkpoints)
    restored = ckpt.restore_latest(program.abstract_state, config.seed)
    ckpt.close()
    if restored:
        params, step = restored.state["params"], restored.step
    else:
        print(f"no checkpoint in {workdir / 'checkpoints'}: evaluating the initial parameters")
        params, step = init_state(program)["params"], 0
    examples = data.load(config, config.data.eval_split)
    results = evaluate(program, make_eval_step(program), params, examples)
    writer = metrics.Writer(workdir, config.steps)
    record = writer.write("eval", step, results)
    writer.report("eval", step, record)
    writer.close()
    if writer.enabled:
        print(final_line("eval", step, record))
    return DONE


def main(mode: str, config: Any, workdir: str) -> int:
    """`run.py train|eval`: validates, then trains or evaluates in `workdir`."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {list(MODES)}, got {mode!r}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    sharding.initialize_distributed(config)  # multi-host: before any other JAX call
    program = setup(config)
    path = Path(workdir)
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(config.to_json_best_effort(indent=1) + "\n")
    return train(program, path) if mode == "train" else run_eval(program, path)
