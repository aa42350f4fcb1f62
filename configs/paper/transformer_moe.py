"""The reference's Transformer-MoE runs in paper form (`run.py train` one width, `run.py sweep`).

One of the reference's config families (transformer-moe-experiments/config/<family>/), at its
base width 256 (x1) or any `scale` (d_model = 256 x scale): its shapes (n_layer, stride, M, K, N_e
per width), learning rate, and tuned multipliers; 4,768 steps of 512 sequences of 1,024 tokens,
warmup 700 from lr/701, cosine to lr/10, AdamW (0.9, 0.95), weight decay 0.1 on every parameter
(lr * wd the same for every group), clip 1.0; sparse families add the load-balancing loss on the
selected sigmoid gates, weight 0.01, summed over layers; QK-norm without gain, exact GELU.
Data: any TFDS text dataset prepared locally (`--config.data.name=...`), byte level (vocab 256;
the reference trains GPT-2 tokens of the OLMo-3 mix); default the embedded Shakespeare corpus.
Arguments: `configs/paper/transformer_moe.py:family=allscale_sparse,scale=2,parameterization=mup`
with family allscale_sparse | allscale_soft | bottleneck_sparse | bottleneck_soft |
efficient_bottleneck (the sparse-with-dense family) and parameterization mssp | mup | sp.
--config.quick=True is the tiny variant the tests run.
"""

from __future__ import annotations

import ml_collections

from configs import common, sweeps_mlp_moe
from mssp_jax import paper

FAMILIES = {"allscale_sparse": "allscale/sparse", "allscale_soft": "allscale/soft",
            "bottleneck_sparse": "bottleneck/sparse", "bottleneck_soft": "bottleneck/soft",
            "efficient_bottleneck": "efficient-bottleneck/sparse-with-dense"}
ARGS = {"family": tuple(FAMILIES), "scale": ("1", "2", "4", "8"),
        "parameterization": ("mssp", "mup", "sp")}


def get_config(arg: str | None = None):
    a = common.parse_args(arg, ARGS)
    family = paper.TRANSFORMER_NATIVE[FAMILIES[a["family"]]]
    m, k, ne = family.widths[256]
    base = (256, ne, m, k)
    c = common.base_config(common.shape(*base, family.n_layer), regime=family.regime,
                           parameterization=a["parameterization"],
                           learning_rate=family.learning_rate)
    c.shape = common.regime_shape(base, family.regime, int(a["scale"]), family.n_layer)
    c.model = "transformer_moe"
    c.constants, c.paper_tuned, c.paper_family = "paper", True, FAMILIES[a["family"]]
    c.vocab_size, c.seq_len, c.head_dim = 256, 1024, 64
    c.moe_every, c.ffn_width = family.stride, 0
    c.qk_norm_gain, c.exact_gelu = False, True
    c.load_balance, c.aux_loss_layers = "selected_gates", "sum"
    c.aux_loss_weight = 0.0 if family.soft else 0.01
    c.optimizer.update(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, decay_all=True,
                       grad_clip=1.0, schedule="cosine", warmup_steps=700,
                       warmup_start="reference", final_lr_ratio=0.1)
    c.steps, c.batch_size = 4768, 512
    c.eval_every, c.eval_steps, c.checkpoint_every, c.log_every = 1000, 200, 500, 10
    c.data = ml_collections.ConfigDict(dict(
        name="shakespeare_plays", data_dir="", train_split="train", eval_split="validation",
        task="", max_bytes=2_000_000_000))
    # `run.py sweep`: the LR transfer over x1 ... x8, 3 seeds (one vmapped program per width)
    c.task, c.data_seed, c.eval_size = "lm", 0, 256
    c.sweep = sweeps_mlp_moe.sweep_fields(
        scales=(1, 2, 4, 8), parameterizations=("sp", "mup", "mssp"), optimizers=("adam",),
        seeds=(0, 1, 2), lr_grids={"adam": tuple(family.learning_rate * 2.0**e
                                                 for e in range(-3, 3))})
    c.sweep.multipliers.enabled = False
    c.quick_overrides = dict(
        base_shape=common.shape(16, 8 if family.regime == "III" else 4, 4, 4 if family.soft else 2,
                                2).to_dict(),
        head_dim=8, seq_len=8, steps=4, batch_size=2, eval_size=4, dispatch="dense",
        optimizer=dict(warmup_steps=2), data=dict(max_bytes=64_000_000),
        sweep=dict(scales=(1, 2), parameterizations=("mssp",), early_steps=2,
                   lr_grids={"adam": (1e-3, 1e30)}))
    return c
