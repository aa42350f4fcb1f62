"""Coordinate check of the MLP-MoE (experiments/coord_check.py): observables vs scale x1..x4.

Same model, task and base shape as configs/sweeps_mlp_moe.py; Adam at one base LR, a few online
steps. Variants: --config configs/sweeps_coord_check.py:regime=I ; --config.quick=True.
"""

from __future__ import annotations

import ml_collections

from configs import sweeps_mlp_moe


def get_config(arg: str | None = None):
    c = sweeps_mlp_moe.get_config(arg)
    c.optimizer.learning_rate = 2.0**-7
    c.batch_size = 32
    c.eval_size = 256  # the probe batch
    c.coord = ml_collections.ConfigDict(dict(
        parameterizations=("sp", "mup", "mssp"), scales=(1, 2, 4), seeds=(0, 1),
        record_steps=(0, 1, 10, 30)))
    c.quick_overrides.update(
        batch_size=4, eval_size=8,
        coord=dict(parameterizations=("mssp",), scales=(1, 2), seeds=(0, 1), record_steps=(0, 2)))
    return c
