"""Periodic, keep-N orbax checkpoints of the training state, restored on restart.

A checkpoint holds the state pytree (``{'params', 'opt_state'}``) and a small JSON record: the step,
the data position (batches consumed) and the seed. Every random choice of a run is a function of
(seed, step) (data order: (seed, epoch); model init: seed), so these restore it exactly. Orbax
writes each step to a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoints intact and `restore_latest` never sees a partial one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


@dataclasses.dataclass(frozen=True)
class Restored:
    state: Any
    step: int
    data_position: int


class Checkpointer:
    """Checkpoints `due` every `every` steps (0: none), keeping the newest `keep`."""

    def __init__(self, directory: str | Path, every: int, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.every = every
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                             item_names=("state", "meta"))

    def due(self, step: int) -> bool:
        """Whether `step` is on the interval (the loop also saves at the end and on a stop)."""
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, data_position: int, seed: int) -> None:
        """Saves `state` at `step` (asynchronously; `close` waits). Every process calls it."""
        meta = {"step": step, "data_position": data_position, "seed": seed}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore_latest(self, like: Any, seed: int) -> Restored | None:
        """The newest checkpoint restored into the structure and shardings of `like` (None: the
        arrays as saved, as nested dicts, for inspection)."""
        step = self.manager.latest_step()
        if step is None:
            return None
        abstract = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        if out.meta["seed"] != seed:
            raise ValueError(f"checkpoint step {step} in {self.manager.directory} was written with "
                             f"seed {out.meta['seed']}, the config has seed {seed}; "
                             "use a new workdir")
        return Restored(out.state, out.meta["step"], out.meta["data_position"])

    def close(self) -> None:
        """Waits for asynchronous saves to finish."""
        self.manager.wait_until_finished()
        self.manager.close()
