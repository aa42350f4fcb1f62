"""The reference's MLP-MoE LR-transfer protocol in paper form (`run.py sweep`).

As the authors' run_lr_sweep.py: base N0 = 128, M0 = 8; regime I N_e = N, M = 8; II N_e = 16,
M = N/16; III N_e = N, M = N/16; widths 128 -> 2048 (x1 ... x16); soft routing or top-K with
K = M/4; T = 1000 online steps of batch P/T = 50 (P = 50,000), each sample seen once; one-hot MSE
averaged over the 10 classes; exact GELU; zero readout in the muP family; 4 seeds; its LR grids
(SGD x2 from 7.8e-4, Adam x sqrt(10) from 3.2e-6); the reference's constants and tuned
multipliers (`constants='paper'`, mssp_jax/paper.py).
Arguments (`configs/paper/mlp_moe.py:regime=II,optimizer=sgd,routing=soft,data=cifar10`):
regime I | II | III; optimizer adam | sgd; routing topk | soft; data teacher (offline, synthetic,
the default) | cifar10 (the reference's CIFAR-10, prepared locally: docs/PIPELINE.md).
--config.quick=True is the tiny variant the tests run.
"""

from __future__ import annotations

import ml_collections

from configs import common, sweeps_mlp_moe

ARGS = {"regime": common.REGIMES, "optimizer": ("adam", "sgd"), "routing": ("topk", "soft"),
        "data": ("teacher", "cifar10")}
LR_GRIDS = {"sgd": tuple(0.00078125 * 2.0**k for k in range(8)),
            "adam": tuple(10.0 ** (-5.5 + k / 2) for k in range(8))}
PARAMETERIZATIONS = {"adam": ("sp", "mup", "mssp", "mup_global_eps", "jiang"),
                     "sgd": ("sp", "mup", "mssp")}


def get_config(arg: str | None = None):
    a = common.parse_args(arg, ARGS)
    regime, optimizer, soft = a["regime"], a["optimizer"], a["routing"] == "soft"
    base = (128, 16 if regime == "II" else 128, 8, 8 if soft else 2)
    c = common.base_config(common.shape(*base), regime=regime, optimizer=optimizer,
                           learning_rate=LR_GRIDS[optimizer][4])
    c.model = "mlp_moe"
    c.constants, c.paper_tuned = "paper", True
    c.loss, c.mse_reduction, c.exact_gelu = "mse", "mean", True
    c.num_classes = 10
    c.steps, c.batch_size, c.eval_size = 1000, 50, 1000
    c.data_seed = 0
    if a["data"] == "teacher":
        c.task, c.input_dim = "teacher", 3072  # the reference's CIFAR-10 input width
    else:
        c.task, c.input_dim = "images", 3072
        c.data = ml_collections.ConfigDict(dict(
            name="cifar10", data_dir="", train_split="train", eval_split="test", task="multiclass",
            max_bytes=0))
    c.sweep = sweeps_mlp_moe.sweep_fields(
        scales=(1, 2, 4, 8, 16), parameterizations=PARAMETERIZATIONS[optimizer],
        optimizers=(optimizer,), seeds=(0, 1, 2, 3), lr_grids=LR_GRIDS)
    c.sweep.multipliers.enabled = False  # the reference's tuned multipliers are in the tables
    c.quick_overrides = dict(
        base_shape=common.shape(8, 4 if regime == "II" else 8, 4, 4 if soft else 1).to_dict(),
        steps=4, batch_size=4, eval_size=8, input_dim=8,
        sweep=dict(scales=(1, 2), parameterizations=("mup", "mssp"), seeds=(0,), early_steps=2,
                   lr_grids={"adam": (1e-3, 1e30), "sgd": (1e-3, 1e30)}))
    return c
