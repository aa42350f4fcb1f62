"""Coordinate check on the x16 protocol (configs/sweeps_x16.py): why muP and MSSP differ, or not.

The same model, data, constants and widths as the x16 LR sweeps (regime II: x1 -> x16), trained
at one LR, the MSSP optimum of the regime-II sweep that the arguments name (Adam 0.1, SGD 0.25 in
the paper form on MNIST-1D; the muP optima are the same there), muP and MSSP; 4 seeds; observables after steps
0, 1, 10, 100 on a probe of 256 held-out inputs. Arguments as configs/sweeps_x16.py.
"""

from __future__ import annotations

import ml_collections

from configs import sweeps_x16

LEARNING_RATE = {"adam": 0.1, "sgd": 0.25}


def get_config(arg: str | None = None):
    c = sweeps_x16.get_config(arg)
    c.optimizer.learning_rate = LEARNING_RATE[c.optimizer.name]
    c.eval_size = 256
    c.coord = ml_collections.ConfigDict(dict(
        parameterizations=("mup", "mssp"), scales=c.sweep.scales, seeds=(0, 1, 2, 3),
        record_steps=(0, 1, 10, 100)))
    c.quick_overrides.update(
        coord=dict(parameterizations=("mssp",), scales=(1, 2), seeds=(0, 1), record_steps=(0, 2)))
    return c
