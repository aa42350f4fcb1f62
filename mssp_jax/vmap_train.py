"""Train many (learning rate, seed) runs of one shape as a single jitted, vmapped program.

An LR sweep at CPU scale is dominated by per-run overheads (tracing, compiling, dispatching one
small step at a time). Here every run shares one compiled program: the optimizer chain is built
once with a unit base LR and its update is multiplied by the run's LR (every chain in
`mssp_jax.optim`, its schedules and gradient clipping end in the base-LR multiply, so this is the
same update), parameters and optimizer states carry a leading (lr, seed) batch, and the steps run
inside `jax.lax.scan`. A diverging run (NaN/inf loss) only marks itself as diverged.

Data is *online*: step t uses rows ``[t * batch_size, (t + 1) * batch_size)`` of ``data['train']``,
so each sample is seen once and the training loss is an unbiased estimate of the test loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mssp_jax import compiler, factory
from mssp_jax.losses import loss_fn
from mssp_jax.params import role_labels

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """Per-run results; leading axes are (lr, seed)."""

    lrs: np.ndarray  # [R]
    seeds: np.ndarray  # [S]
    train_loss: np.ndarray  # [R, S, steps] online (fresh-batch) training loss per step
    eval_loss: np.ndarray  # [R, S] loss on data['eval'] after the last step
    diverged: np.ndarray  # [R, S] bool: a non-finite loss occurred

    def run(self, i: int, j: int) -> dict[str, Any]:
        """One run as plain JSON-able values (non-finite losses become None)."""
        finite = lambda x: float(x) if np.isfinite(x) else None  # noqa: E731
        return {"lr": float(self.lrs[i]), "seed": int(self.seeds[j]),
                "eval_loss": finite(self.eval_loss[i, j]), "diverged": bool(self.diverged[i, j]),
                "train_loss": [finite(x) for x in self.train_loss[i, j]]}


def unit_lr_config(config: Any) -> Any:
    """A copy of `config` whose base LR is 1 (the run's LR multiplies the update instead)."""
    unit = config.copy_and_resolve_references()
    unit.optimizer.learning_rate = 1.0
    return unit


def init_states(config: Any, seeds: Sequence[int]) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, pure params stacked over seeds [S, ...], the non-Param state of seed 0).

    Pure (array-leaved) states are what the role-labelled optax chains are built against.
    """
    scaling = factory.validate(config)
    graphdef, rest, per_seed = None, None, []
    for seed in seeds:
        model = factory.build_model(config, nnx.Rngs(int(seed)), scaling)
        graphdef, params, rest_s = nnx.split(model, nnx.Param, ...)
        rest = rest if rest is not None else rest_s
        per_seed.append(nnx.pure(params))
    return graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *per_seed), rest


def check_data(config: Any, data: dict[str, Batch]) -> None:
    """Online training needs steps * batch_size training rows."""
    rows, needed = len(data["train"]["inputs"]), config.steps * config.batch_size
    if rows < needed:
        raise ValueError(f"data['train'] has {rows} rows; steps * batch_size = {config.steps} * "
                         f"{config.batch_size} = {needed} are needed (each sample is used once)")


def role_factors(labels: Any, factors: dict[str, float] | None) -> Any:
    """A per-leaf float tree: `factors[role]` (default 1) for each parameter's role. A role that
    no parameter has is an error (a misspelt multiplier knob would otherwise do nothing)."""
    factors = factors or {}
    roles = set(jax.tree.leaves(labels))
    if set(factors) - roles:
        raise ValueError(f"multiplier roles {sorted(set(factors) - roles)} are not roles of this "
                         f"model: {sorted(roles)}")
    return jax.tree.map(lambda role: float(factors.get(role, 1.0)), labels)


@dataclasses.dataclass(frozen=True)
class Trainable:
    """What one training step needs: the split model, its optimizer at unit LR, its loss."""

    graphdef: nnx.GraphDef
    params: Any  # pure params, stacked over seeds [S, ...]
    rest: Any
    tx: optax.GradientTransformation
    labels: Any  # role string per parameter leaf
    config: Any

    def loss(self, p: Any, batch: Batch) -> jax.Array:
        return loss_fn(nnx.merge(self.graphdef, p, self.rest), batch, self.config)[0]


def trainable(config: Any, seeds: Sequence[int]) -> Trainable:
    """Builds and splits the model of `config` once per seed, and its unit-LR optimizer."""
    unit = unit_lr_config(config)
    scaling = factory.validate(unit)
    graphdef, params, rest = init_states(unit, seeds)
    probe = nnx.merge(graphdef, jax.tree.map(lambda x: x[0], params), rest)
    return Trainable(graphdef, params, rest, factory.build_optimizer(unit, scaling, probe),
                     role_labels(probe), config)


def lr_chunk(n_lrs: int, n_seeds: int, max_runs: int) -> int:
    """LRs per compiled program: as few programs as `max_runs` runs each (0: no bound) allows,
    sized evenly, so the padding (the last LR repeated to keep one compiled shape) stays under one
    LR per program: 2 LRs with room for 8 run as 2, not as 8."""
    if not max_runs:
        return n_lrs
    programs = -(-n_lrs // max(max_runs // n_seeds, 1))
    return -(-n_lrs // programs)


def train_lrs(config: Any, lrs: Sequence[float], seeds: Sequence[int], data: dict[str, Batch],
              role_multipliers: Sequence[dict[str, dict[str, float]]] | None = None,
              max_runs: int = 0) -> SweepResult:
    """Trains every (lr, seed) pair of `config`'s shape for `config.steps` online steps.

    `role_multipliers` (one per lr) optionally scales, per role, the sampled init (``'init'``) and
    the learning rate (``'lr'``) on top of the parameterization: the knobs of a multiplier sweep,
    batched like the LRs so a whole multiplier grid is one compiled program. `max_runs` (0: all)
    bounds the (lr, seed) runs vmapped together; the LRs then go in equal chunks through the
    same compiled program, one after the other (what memory allows at large widths).
    """
    check_data(config, data)
    t = trainable(config, seeds)
    mults = role_multipliers or [{}] * len(lrs)
    if len(mults) != len(lrs):
        raise ValueError(f"role_multipliers has {len(mults)} entries; "
                         f"one per lr ({len(lrs)}) needed")
    stack = lambda trees: jax.tree.map(  # noqa: E731
        lambda *xs: jnp.asarray(xs, jnp.float32), *trees)
    lr_trees = stack([jax.tree.map(lambda f, lr=lr: lr * f, role_factors(t.labels, m.get("lr")))
                      for lr, m in zip(lrs, mults)])
    init_trees = stack([role_factors(t.labels, m.get("init")) for m in mults])
    steps, bsz = config.steps, config.batch_size
    train = jax.tree.map(lambda x: jnp.asarray(x[: steps * bsz]).reshape(steps, bsz, *x.shape[1:]),
                         data["train"])
    evalset = jax.tree.map(jnp.asarray, data["eval"])

    def one_run(lr_tree, init_tree, p):
        def step(carry, batch):
            p, opt_state = carry
            loss, grads = jax.value_and_grad(t.loss)(p, batch)
            updates, opt_state = t.tx.update(grads, opt_state, p)
            return (optax.apply_updates(p, jax.tree.map(jnp.multiply, lr_tree, updates)),
                    opt_state), loss

        p = jax.tree.map(jnp.multiply, init_tree, p)
        (p, _), losses = jax.lax.scan(step, (p, t.tx.init(p)), train)
        return losses, t.loss(p, evalset)

    over_seeds = jax.vmap(one_run, in_axes=(None, None, 0))
    over_runs = compiler.jit(jax.vmap(over_seeds, in_axes=(0, 0, None)))
    chunk = lr_chunk(len(lrs), len(seeds), max_runs)
    pad = -len(lrs) % chunk  # repeat the last LR so every chunk has the compiled shape
    padded = jax.tree.map(lambda x: jnp.concatenate([x] + [x[-1:]] * pad), (lr_trees, init_trees))
    parts = [over_runs(*jax.tree.map(lambda x, i=i: x[i:i + chunk], padded), t.params)
             for i in range(0, len(lrs) + pad, chunk)]
    losses, eval_loss = (np.concatenate([np.asarray(p[k]) for p in parts])[:len(lrs)]
                         for k in (0, 1))
    diverged = ~np.isfinite(losses).all(-1) | ~np.isfinite(eval_loss)
    return SweepResult(np.asarray(lrs, np.float64), np.asarray(seeds), losses, eval_loss, diverged)
