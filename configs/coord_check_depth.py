"""Coordinate check over depth (issue 15): MSSP with each depth rule, L = 2 -> 16.

The depth sweep's Transformer-MoE (configs/sweeps_depth.py: N = 32, L0 = 2, regime-III base,
embedded Shakespeare) at one LR 2^-6 (MSSP's optimum at the base in the earlier Transformer
sweep), L = 2, 4, 8, 16 (grow=depth) or width and depth x1 -> x4 (grow=both); 3 seeds;
observables after steps 0, 1, 10, 100 on 32 validation windows, including the residual stream at
the top of the stack and every block's output. Arguments as configs/sweeps_depth.py.
"""

from __future__ import annotations

import ml_collections

from configs import sweeps_depth


def get_config(arg: str | None = None):
    c = sweeps_depth.get_config(arg)
    c.optimizer.learning_rate = 2.0**-6
    c.optimizer.warmup_steps = 0  # step 1 is a full step
    c.eval_size = 32
    c.coord = ml_collections.ConfigDict(dict(
        parameterizations=sweeps_depth.DEPTH_RULES, scales=c.sweep.scales, seeds=(0, 1, 2),
        record_steps=(0, 1, 10, 100)))
    c.quick_overrides.update(coord=dict(parameterizations=("mssp+completep",), scales=(1, 2),
                                        seeds=(0, 1), record_steps=(0, 2)))
    return c
