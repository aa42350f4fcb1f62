"""MLP-MoE (the paper's model) on the embedded UCI handwritten digits (8x8 images, 10 classes).

Base shape as the reference: N0 = 128 would be too slow on 2 CPU cores, so the CPU-scale base is
N0 = 64, M0 = 8 with N_e = 16 (regime II) or N_e = N (I, III); top_k = M / 4.
Variants: --config configs/mlp_moe.py:regime=II,scale=4 scales N (and M / N_e per regime);
task=binary is the reference's two-class task (digits 0 vs 1, one output, +-1 targets, MSE).
Other data: --config.data.name=cifar10 --config.input_dim=3072 (prepared locally, see
docs/PIPELINE.md).
"""

from __future__ import annotations

import ml_collections

from configs import common

BASE = {"I": (64, 64, 8, 2), "II": (64, 16, 8, 2), "III": (64, 64, 8, 2)}
TASKS = ("multiclass", "binary")


def get_config(arg: str | None = None):
    args = common.parse_args(arg, {"regime": common.REGIMES, "task": TASKS}, scale=1)
    regime, scale, task = args["regime"], args["scale"], args["task"]
    c = common.base_config(common.shape(*BASE[regime]), regime=regime, learning_rate=1e-2)
    c.shape = common.regime_shape(BASE[regime], regime, scale)
    c.model = "mlp_moe"
    c.input_dim = 64  # 8 x 8 x 1 digits
    c.num_classes = 1 if task == "binary" else 10  # model outputs (1: scalar +-1 target)
    c.loss = "mse"  # 'mse' (one-hot, as the reference) | 'cross_entropy'
    c.mse_reduction = "sum"  # over classes: 'sum' | 'mean' (reference, PyTorch's mse_loss)
    c.data = ml_collections.ConfigDict(dict(
        name="uci_digits",  # embedded; or any image-classification TFDS dataset prepared locally
        data_dir="",  # '' = TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
        train_split="train", eval_split="validation",
        task=task,  # 'multiclass' | 'binary' (classes 0 and 1)
        max_bytes=0))  # text datasets only
    c.steps = 300
    c.batch_size = 64
    c.eval_every = 100
    c.eval_steps = 0
    return c
