"""The paper's MLP-MoE LR-transfer protocol at the widest range 2 CPU cores allow (issue 11).

Five widths spanning x16 (N = 32 -> 512; regime III four, x8: see SCALES), base M0 = 4, K = M/4
top-K routing (soft routing: routing=soft): regime I N_e = N, M = 4; II N_e = 16, M = N/8; III
N_e = N, M = N/8. Online training (every sample seen once), one-hot MSE averaged over the 10
classes, exact GELU, zero readout in the muP family; 4 seeds; LR grids spaced as the reference's
(SGD x2, Adam x sqrt(10)).
Arguments (`configs/sweeps_x16.py:regime=III,optimizer=sgd,data=teacher,constants=ratio`):
regime II | I | III; optimizer adam | sgd; data mnist1d (MNIST-1D, generated locally) | teacher
(the synthetic teacher task); constants paper (the reference's constants without its tuned
multipliers, which belong to its N0 = 128 CIFAR/TinyImageNet base) | ratio (our presets, 1 at the
base); routing topk | soft. --config.quick=True is the tiny variant the tests run.
"""

from __future__ import annotations

import ml_collections

from configs import common, sweeps_mlp_moe
from configs.paper.mlp_moe import PARAMETERIZATIONS

ARGS = {"regime": common.REGIMES, "optimizer": ("adam", "sgd"), "data": ("mnist1d", "teacher"),
        "constants": ("paper", "ratio"), "routing": ("topk", "soft")}
# Grids: the reference's spacing (SGD x2, Adam x sqrt(10)), placed by a 300-step pilot at x1 and x4
# (regime II, MNIST-1D) so that every optimum was inside; the paper form's LRs multiply absolute
# factors (1/fan_in, ...), the ratio form's are the LR at the base itself.
LR_GRIDS = {
    "paper": {"adam": tuple(10.0 ** (-3 + k / 2) for k in range(7)),
              "sgd": tuple(2.0 ** (k - 3) for k in range(8))},
    "ratio": {"adam": tuple(10.0 ** (-3.5 + k / 2) for k in range(7)),
              "sgd": tuple(2.0 ** (k - 2) for k in range(8))},
}
# Regime III at N = 512 (M = 64, N_e = 512) costs ~2 h per cell here (8x x8's 15 min, measured):
# it spans x8 (N = 32 -> 256); I and II span x16.
SCALES = {"I": (1, 2, 4, 8, 16), "II": (1, 2, 4, 8, 16), "III": (1, 2, 4, 8)}


def get_config(arg: str | None = None):
    a = common.parse_args(arg, ARGS)
    regime, optimizer, soft = a["regime"], a["optimizer"], a["routing"] == "soft"
    base = (32, 16 if regime == "II" else 32, 4, 4 if soft else 1)
    c = common.base_config(common.shape(*base), regime=regime, optimizer=optimizer)
    c.model = "mlp_moe"
    c.constants, c.paper_tuned = a["constants"], False
    c.loss, c.mse_reduction, c.exact_gelu = "mse", "mean", True
    c.num_classes = 10
    c.steps, c.batch_size, c.eval_size = 1000, 16, 2000
    c.dispatch = "dense"  # measured fastest exact dispatch for these vmapped small batches
    c.data_seed = 0
    if a["data"] == "teacher":
        c.task, c.input_dim = "teacher", 40
    else:
        c.task, c.input_dim = "images", 40
        c.data = ml_collections.ConfigDict(dict(
            name="mnist1d", data_dir="", train_split="train", eval_split="validation",
            task="multiclass", max_bytes=0))
    c.sweep = sweeps_mlp_moe.sweep_fields(
        scales=SCALES[regime], parameterizations=PARAMETERIZATIONS[optimizer],
        optimizers=(optimizer,), seeds=(0, 1, 2, 3), lr_grids=LR_GRIDS[a["constants"]])
    c.sweep.multipliers.enabled = False
    c.sweep.max_runs_per_program = 32  # LR x seed runs vmapped together (memory at N = 512)
    # An optimum on a grid end widens that end by 2 steps, 4 times at most (SGD 16 -> 64 -> ...
    # -> 4096): cheap, as only the families on an end (SP's) run, with 2 LRs each
    c.sweep.extend_edges = 4
    c.quick_overrides = dict(
        steps=4, batch_size=4, eval_size=8,
        sweep=dict(scales=(1, 2), parameterizations=("mssp",), seeds=(0,), early_steps=2,
                   extend_edges=0,
                   lr_grids={"adam": (1e-3, 1e30), "sgd": (1e-3, 1e30)}))
    return c
