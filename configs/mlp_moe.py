"""MLP-MoE (the paper's model) on an offline image classification task.

Base shape as the reference: N0 = 128 would be too slow on 2 CPU cores, so the CPU-scale base is
N0 = 64, M0 = 8 with N_e = 16 (regime II) or N_e = N (I, III); top_k = M / 4.
Variants: --config configs/mlp_moe.py:regime=II,scale=4 scales N (and M / N_e per regime).
"""

from __future__ import annotations

from configs import common

BASE = {"I": (64, 64, 8, 2), "II": (64, 16, 8, 2), "III": (64, 64, 8, 2)}


def get_config(arg: str | None = None):
    args = common.parse_arg(arg)
    regime, scale = args.get("regime", "II"), int(args.get("scale", "1"))
    c = common.base_config(common.shape(*BASE[regime]), regime=regime, learning_rate=1e-2)
    c.shape = common.regime_shape(BASE[regime], regime, scale)
    c.model = "mlp_moe"
    c.input_dim = 3072
    c.num_classes = 10
    c.loss = "mse"  # 'mse' (one-hot, as the reference) | 'cross_entropy'
    return c
