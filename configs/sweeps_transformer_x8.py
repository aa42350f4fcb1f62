"""The paper's Transformer-MoE LR transfer in paper form, at a CPU-affordable size (issue 11).

Sparse routing (K/M = 1/2, as the reference's sparse families), Adam(W) as the reference's runs
(b2 0.95, weight decay 0.1 on every parameter, clip 1.0, warmup from lr/(w+1), cosine to lr/10),
its load-balancing loss (selected sigmoid gates, weight 0.01, summed over layers), QK-norm without
gain, exact GELU, the paper form's constants (without the tuned multipliers of its d_model-256
base). Base N0 = 16 (head_dim 8), L = 4 blocks, M0 = 4, K0 = 2; regime II N_e = 8, regime III
N_e = N/2; widths x1, x2, x4, x8 (N = 16 -> 128); 1,000 online steps of 8 windows of 32 bytes of
the embedded Shakespeare corpus (each window seen once); 3 seeds; sp / mup / mssp.
Arguments: `configs/sweeps_transformer_x8.py:regime=II` (III is the default); `tune=base`: MSSP
alone, its per-role multipliers first tuned at the base width (one knob at a time, x1/4 and x4,
seed 0, every LR), then the x1 -> x8 LR cells with the best point: does a base-tuned MSSP close
the gap to SP? --config.quick=True is the tiny variant the tests run.
"""

from __future__ import annotations

import ml_collections

from configs import common, sweeps_mlp_moe, transformer_moe

ARGS = {"regime": ("III", "II"), "tune": ("none", "base")}
# Knobs of the base tuning (tune=base): [kind, roles...], each set to x1/4 and x4, the others at 1
BASE_KNOBS = {"lr_embedding": ("lr", "embedding"), "lr_norm": ("lr", "norm"),
              "lr_attention": ("lr", "attn_qkv", "attn_out"),
              "lr_moe": ("lr", "router", "expert_up", "expert_down"),
              "lr_readout": ("lr", "readout"),
              "init_hidden": ("init", "attn_qkv", "attn_out", "expert_up", "expert_down")}
BASE = {"II": (16, 8, 4, 2), "III": (16, 8, 4, 2)}
LR_GRID = tuple(10.0 ** (-3.5 + k / 2) for k in range(6))  # x sqrt(10), as the reference's grids


def get_config(arg: str | None = None):
    args = common.parse_args(arg, ARGS)
    regime = args["regime"]
    c = transformer_moe.get_config(f"regime={regime}")
    c.base_shape = common.shape(*BASE[regime], 4)
    c.shape = common.regime_shape(BASE[regime], regime, 1, 4)
    c.constants, c.paper_tuned = "paper", False
    c.head_dim, c.seq_len = 8, 32
    c.qk_norm_gain, c.exact_gelu = False, True
    c.load_balance, c.aux_loss_layers, c.aux_loss_weight = "selected_gates", "sum", 0.01
    c.optimizer.update(b1=0.9, b2=0.95, weight_decay=0.1, decay_all=True, grad_clip=1.0,
                       schedule="cosine", warmup_steps=50, warmup_start="reference",
                       final_lr_ratio=0.1)
    c.task, c.data_seed = "lm", 0
    c.steps, c.batch_size, c.eval_size = 1000, 8, 256
    c.sweep = sweeps_mlp_moe.sweep_fields(
        scales=(1, 2, 4, 8), parameterizations=("sp", "mup", "mssp"), optimizers=("adam",),
        seeds=(0, 1, 2), lr_grids={"adam": LR_GRID, "sgd": LR_GRID})
    c.sweep.extend_edges = 2  # an optimum on a grid end: 2 more LRs beyond it, twice at most
    c.sweep.multipliers.enabled = args["tune"] == "base"
    if c.sweep.multipliers.enabled:
        c.sweep.parameterizations = ("mssp",)
        c.sweep.multipliers.update(parameterization="mssp", factors=(0.25, 4.0), seeds=(0,),
                                   use=tuple(BASE_KNOBS))
        c.sweep.multipliers.knobs = ml_collections.ConfigDict(BASE_KNOBS)
    c.quick_overrides = dict(
        steps=4, batch_size=2, eval_size=4, seq_len=8,
        sweep=dict(scales=(1, 2), parameterizations=("mssp",), seeds=(0,), early_steps=2,
                   extend_edges=0,
                   lr_grids={"adam": (1e-3, 1e30), "sgd": (1e-3, 1e30)}))
    return c
