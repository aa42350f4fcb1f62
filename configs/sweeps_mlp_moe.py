"""LR-transfer sweep of the MLP-MoE: LR grid x scale x parameterization x optimizer, one regime.

CPU-scale version of the reference protocol (PARAMETERIZATIONS.md): base N0 = 32, M0 = 4, K0 = 1
(K/M = 1/4), N_e0 = N0 (I, III) or 8 (II); scales x1, x2, x4; online training on a fixed
synthetic teacher task (10 classes, one-hot MSE, zero-init readout in the muP family).
Variants: --config configs/sweeps_mlp_moe.py:regime=I ; --config.quick=True shrinks everything.
"""

from __future__ import annotations

import ml_collections

from configs import common

BASE = {"I": (32, 32, 4, 1), "II": (32, 8, 4, 1), "III": (32, 32, 4, 1)}
LR_GRIDS = {"adam": tuple(2.0**e for e in range(-11, -3)),
            "sgd": tuple(2.0**e for e in range(-6, 2))}


def sweep_fields(*, scales, parameterizations, optimizers, seeds, lr_grids):
    """The `sweep` block shared by the sweep families."""
    return ml_collections.ConfigDict(dict(
        scales=scales, parameterizations=parameterizations, optimizers=optimizers, seeds=seeds,
        lr_grids=lr_grids, early_steps=40,
        grow="width",  # what the scales multiply: 'width' (in the regime) | 'depth' | 'both'
        # parameterizations: preset names, or 'preset+depth rule' (e.g. 'mssp+completep')
        only_summarize=False,  # True: summarise/plot the finished cells, train nothing
        merge_workdirs=(),  # workdirs of the same plan with other seeds: their runs are merged
        # Grid widening: while a family's optimum sits on an end of its LR grid at some scale, up
        # to `extend_edges` rounds add `extend_by` LRs beyond that end (same spacing, every scale)
        extend_edges=0, extend_by=2,
        # Multiplier sweep at the base shape: each knob ([kind, roles...]) in `use` is set to each
        # of `factors` with the others at 1 (a one-at-a-time grid); every point runs the LR grid.
        multipliers=ml_collections.ConfigDict(dict(
            enabled=True, parameterization="mssp", factors=(0.25, 4.0), seeds=(0,),
            knobs={"init_experts": ("init", "expert_up", "expert_down"),
                   "lr_input": ("lr", "input"), "lr_router": ("lr", "router"),
                   "lr_experts": ("lr", "expert_up", "expert_down"),
                   "lr_readout": ("lr", "readout")},
            use=("init_experts", "lr_input", "lr_router", "lr_experts", "lr_readout"))),
    ))


def get_config(arg: str | None = None):
    regime = common.parse_args(arg, {"regime": common.REGIMES})["regime"]
    c = common.base_config(common.shape(*BASE[regime]), regime=regime)
    c.model = "mlp_moe"
    c.task = "teacher"
    c.input_dim = 64
    c.num_classes = 10
    c.loss = "mse"
    c.data_seed = 0
    c.steps = 200
    c.batch_size = 16
    c.eval_size = 1000
    c.sweep = sweep_fields(
        scales=(1, 2, 4),
        parameterizations=("sp", "mup", "mssp", "mup_global_eps", "jiang"),
        optimizers=("adam", "sgd"), seeds=(0, 1), lr_grids=LR_GRIDS)
    c.quick_overrides = quick_overrides(regime)
    return c


def quick_overrides(regime: str) -> dict:
    """What `--config.quick=True` changes: tiny shapes and grids and the dispatch that compiles
    fastest, for the end-to-end tests (an LR of 1e30 makes one run per cell diverge, so
    divergence handling is exercised)."""
    return dict(
        base_shape=common.shape(8, 4 if regime == "II" else 8, 4, 1).to_dict(),
        steps=6, batch_size=4, eval_size=16, input_dim=8, dispatch="dense",
        sweep=dict(scales=(1, 2), parameterizations=("sp", "mssp"), optimizers=("adam",),
                   seeds=(0,),
                   lr_grids={"adam": (1e-2, 1e30), "sgd": (1e-2, 1e30)}, early_steps=3,
                   multipliers=dict(factors=(4.0,), use=("lr_readout",))),
    )
