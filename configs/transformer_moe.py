"""Transformer-MoE language model on the embedded Shakespeare corpus (byte level).

The default is the main job of `python run.py`: small enough to train in minutes on 2 CPU cores.
Variants: --config configs/transformer_moe.py:regime=III,scale=2.
Other data: --config.data.name=tiny_shakespeare (or lm1b, ...) prepared locally, see
docs/PIPELINE.md.
"""

from __future__ import annotations

import ml_collections

from configs import common

BASE = {"I": (64, 64, 4, 2), "II": (64, 16, 4, 2), "III": (64, 64, 4, 2)}


def get_config(arg: str | None = None):
    args = common.parse_args(arg, {"regime": ("III", "I", "II")}, scale=1)
    regime, scale, depth = args["regime"], args["scale"], 2
    c = common.base_config(common.shape(*BASE[regime], depth), regime=regime, learning_rate=1e-2)
    c.shape = common.regime_shape(BASE[regime], regime, scale, depth)
    c.model = "transformer_moe"
    c.vocab_size = 256  # bytes
    c.seq_len = 64
    c.head_dim = 16
    c.qk_norm_gain = True  # False: QK-norm without a learnable gain (reference)
    c.moe_every = 1
    c.ffn_width = 0  # dense FFN width in non-MoE blocks (0 = 4 N)
    # True: blocks stacked in groups of moe_every and applied by nnx.scan (compile time and memory
    # independent of depth; needs depth divisible by moe_every); same function as unrolled
    c.scan_layers = False
    # 'none' | 'full' | 'dots_saveable': recompute activations in the backward pass
    c.remat = "none"
    c.aux_loss_weight = 0.01
    c.optimizer.b2 = 0.95
    c.optimizer.weight_decay = 0.1
    c.optimizer.grad_clip = 1.0
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 30
    c.data = ml_collections.ConfigDict(dict(
        name="shakespeare_plays",  # embedded; or any TFDS text dataset prepared locally
        data_dir="",  # '' = TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
        train_split="train", eval_split="validation",
        task="",  # classification datasets only
        max_bytes=64_000_000))  # text held in memory per split (the first bytes of big datasets)
    c.steps = 400
    c.batch_size = 32
    c.eval_every = 100
    c.eval_steps = 8
    c.checkpoint_every = 100
    return c
