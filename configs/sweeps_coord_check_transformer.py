"""Coordinate check of the Transformer-MoE (experiments/coord_check.py): observables vs scale.

Same model, corpus and base shape as configs/sweeps_transformer_moe.py (byte-level Shakespeare,
N0 = 32, head_dim 16, M0 = 4, K0 = 1, L = 2, sequences of 32 bytes, batch 16, Adam with clipping
1.0 and aux loss 0.01); scales x1, x2, x4, x8 in regime II (N ~ M ~ K, N_e = 8) or III (N, N_e, M,
K all grow); 3 seeds; one base LR 2^-6 (every parameterization's optimum at x1 in the regime-III
sweep), constant, no warmup (step 1 is a full step); observables after steps 0, 1, 10, 100 on a
probe of 32 validation windows.
Variants: --config configs/sweeps_coord_check_transformer.py:regime=II ;
:regime=III,parameterization=mup (one parameterization) ; --config.constants=paper (the reference
code's constants, where mssp_jax.paper has them) ; --config.quick=True.
"""

from __future__ import annotations

import ml_collections

from configs import common, sweeps_transformer_moe

ARGS = {"regime": ("III", "II"), "parameterization": ("all", "sp", "mup", "mssp")}


def get_config(arg: str | None = None):
    args = common.parse_args(arg, ARGS)
    c = sweeps_transformer_moe.get_config(f"regime={args['regime']}")
    c.optimizer.learning_rate = 2.0**-6
    c.optimizer.warmup_steps = 0
    c.eval_size = 32  # the probe batch (32 windows of 32 bytes)
    named = None if args["parameterization"] == "all" else args["parameterization"]
    c.coord = ml_collections.ConfigDict(dict(
        parameterizations=(named,) if named else ("sp", "mup", "mssp"), scales=(1, 2, 4, 8),
        seeds=(0, 1, 2), record_steps=(0, 1, 10, 100)))
    c.quick_overrides.update(
        base_shape=common.shape(16, 8, 4, 1, 2).to_dict(),
        coord=dict(parameterizations=(named or "mssp",), scales=(1, 2), seeds=(0, 1),
                   record_steps=(0, 2)))
    return c
