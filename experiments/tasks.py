"""The data an experiment trains on, as arrays for `mssp_jax.vmap_train` (online: rows used once).

* ``teacher``: a fixed random two-layer teacher labels Gaussian inputs (argmax of its logits).
  Synthetic but deterministic and unlimited, so online training never repeats a sample and
  every width sees exactly the same stream. (The pipeline's UCI digits set has 1,797 samples,
  fewer than one online pass of the sweeps needs.)
* ``lm``: byte-level language modelling on the pipeline's text dataset (``config.data``, by
  default the embedded Shakespeare corpus, `mssp_jax.data`): training windows in a fixed random
  order (``data_seed``), each used once; eval windows from the validation split.
* ``images``: the pipeline's image-classification dataset (``config.data``, e.g. CIFAR-10
  prepared locally), flattened and standardised, rows in a fixed random order, each used once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mssp_jax import data as data_lib
from mssp_jax.scaling import ConfigError

Split = dict[str, np.ndarray]
TASKS = ("teacher", "lm", "images")


def teacher(input_dim: int, num_classes: int, rows: int, seed: int = 0,
            hidden: int = 64) -> Split:
    """`rows` samples x ~ N(0, I) labelled by the argmax of a random GELU teacher."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((input_dim, hidden)) / np.sqrt(input_dim)
    w2 = rng.standard_normal((hidden, num_classes)) / np.sqrt(hidden)
    x = rng.standard_normal((rows, input_dim)).astype(np.float32)
    h = x @ w1
    gelu = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    return {"inputs": x, "targets": np.argmax(gelu @ w2, -1).astype(np.int32)}


def load(config: Any) -> dict[str, Split]:
    """{'train': steps * batch_size rows, 'eval': config.eval_size rows} for `config.task`."""
    n_train, n_eval = config.steps * config.batch_size, config.eval_size
    if config.task == "teacher":
        rows = teacher(config.input_dim, config.num_classes, n_train + n_eval, config.data_seed)
        return {"train": {k: v[:n_train] for k, v in rows.items()},
                "eval": {k: v[n_train:] for k, v in rows.items()}}
    if config.task in ("lm", "images"):
        return {"train": dataset_rows(config, config.data.train_split, n_train),
                "eval": dataset_rows(config, config.data.eval_split, n_eval)}
    raise ConfigError(f"task must be one of {list(TASKS)}, got {config.task!r}")


def dataset_rows(config: Any, split: str, rows: int) -> Split:
    """`rows` distinct examples (text windows or images) of `split`, drawn in an order fixed by
    ``config.data_seed``."""
    examples = data_lib.load(config, split)
    if rows > examples.num:
        raise ConfigError(f"{split!r} of {config.data.name!r} has {examples.num} examples; {rows} "
                          "are needed (steps * batch_size or eval_size)")
    order = np.random.default_rng(config.data_seed).permutation(examples.num)[:rows]
    return examples.take(order)
