"""LR-transfer sweep of the Transformer-MoE on the embedded Shakespeare corpus (byte level).

A reduced version of the paper's language-model sweep for 2 CPU cores: regime III, Adam,
base N0 = 32 (head_dim 16), N_e0 = 32, M0 = 4, K0 = 1, L = 2, sequences of 32 bytes; scales
x1, x2, x4; 6 LRs spaced x2; online training (each window seen once). No multiplier sweep.
Variants: --config configs/sweeps_transformer_moe.py:regime=II ; --config.quick=True.
"""

from __future__ import annotations

from configs import common, sweeps_mlp_moe, transformer_moe

BASE = {"I": (32, 32, 4, 1), "II": (32, 8, 4, 1), "III": (32, 32, 4, 1)}
LR_GRIDS = {"adam": tuple(2.0**e for e in range(-9, -3)),
            "sgd": tuple(2.0**e for e in range(-4, 2))}


def get_config(arg: str | None = None):
    regime = common.parse_args(arg, {"regime": ("III", "I", "II")})["regime"]
    c = transformer_moe.get_config(f"regime={regime}")
    c.base_shape = common.shape(*BASE[regime], 2)
    c.shape = common.regime_shape(BASE[regime], regime, 1, 2)
    c.task = "lm"
    c.data_seed = 0
    c.seq_len = 32
    c.steps = 150
    c.batch_size = 16
    c.eval_size = 512  # validation windows (The Tempest)
    c.optimizer.schedule = "constant"  # the LR is the swept quantity: no decay to blur it
    c.optimizer.warmup_steps = 10
    c.optimizer.weight_decay = 0.0
    c.sweep = sweeps_mlp_moe.sweep_fields(
        scales=(1, 2, 4), parameterizations=("sp", "mup", "mssp"), optimizers=("adam",),
        seeds=(0,), lr_grids=LR_GRIDS)
    c.sweep.multipliers.enabled = False
    c.quick_overrides = dict(
        base_shape=common.shape(16, 8, 4, 1, 1).to_dict(), head_dim=8, seq_len=8,
        steps=4, batch_size=2, eval_size=4, dispatch="dense",
        sweep=dict(scales=(2,), parameterizations=("mssp",), early_steps=2,
                   lr_grids={"adam": (1e-2, 1e30), "sgd": (1e-2, 1e30)}))
    return c
