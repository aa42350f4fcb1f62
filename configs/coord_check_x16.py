"""Coordinate check on the x16 protocol (configs/sweeps_x16.py): why muP and MSSP differ, or not.

The same model, data, constants and widths as the x16 LR sweeps, trained at one LR for both muP
and MSSP: the MSSP optimum of the paper-form MNIST-1D sweep of the regime and optimizer the
arguments name (its seed-mean optimum at the largest width; muP's is the same or one grid step
away); 4 seeds; observables after steps 0, 1, 10, 100 on a probe of 256 held-out inputs.
Arguments as configs/sweeps_x16.py.
"""

from __future__ import annotations

import ml_collections

from configs import sweeps_x16

LEARNING_RATE = {("II", "adam"): 0.1, ("II", "sgd"): 0.25, ("III", "adam"): 0.1,
                 ("III", "sgd"): 1.0, ("I", "adam"): 0.1, ("I", "sgd"): 2.0}


def get_config(arg: str | None = None):
    c = sweeps_x16.get_config(arg)
    c.optimizer.learning_rate = LEARNING_RATE[c.regime, c.optimizer.name]
    c.eval_size = 256
    c.coord = ml_collections.ConfigDict(dict(
        parameterizations=("mup", "mssp"), scales=c.sweep.scales, seeds=(0, 1, 2, 3),
        record_steps=(0, 1, 10, 100)))
    c.quick_overrides.update(
        coord=dict(parameterizations=("mssp",), scales=(1, 2), seeds=(0, 1), record_steps=(0, 2)))
    return c
