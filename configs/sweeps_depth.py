"""Depth transfer of the complete prescription (issue 15): MSSP with each depth rule.

Transformer-MoE on the embedded Shakespeare corpus with the regime-III base of
configs/sweeps_transformer_moe.py (N0 = 32, head_dim 16, N_e0 = 32, M0 = 4, K0 = 1) and L0 = 2
blocks; MSSP with depth scaling none / depth_mup (branch L^-1/2, Adam LR L^-1/2) / completep
(branch 1/L, eps 1/L); Adam; 3 seeds; 500 online steps of 16 windows of 32 bytes; LR grid x2.
Arguments: grow=depth (L = 2, 4, 8, 16 at N = 32) | both (width and depth together in regime III,
x1 -> x4: N 32 -> 128, L 2 -> 8). --config.quick=True is the tiny variant the tests run.
"""

from __future__ import annotations

from configs import common, sweeps_transformer_moe

ARGS = {"grow": ("depth", "both")}
SCALES = {"depth": (1, 2, 4, 8), "both": (1, 2, 4)}
DEPTH_RULES = ("mssp+none", "mssp+depth_mup", "mssp+completep")
LR_GRID = tuple(2.0**e for e in range(-10, -2))  # 8 points, x2


def get_config(arg: str | None = None):
    grow = common.parse_args(arg, ARGS)["grow"]
    c = sweeps_transformer_moe.get_config("regime=III")
    c.steps = 500
    c.sweep.update(grow=grow, scales=SCALES[grow], parameterizations=DEPTH_RULES,
                   seeds=(0, 1, 2), lr_grids={"adam": LR_GRID, "sgd": LR_GRID})
    c.quick_overrides["sweep"].update(scales=(1, 2), parameterizations=("mssp+completep",))
    return c
