"""From an ml_collections config to a Scaling, a model and an optimizer, validated before compute.

Config layout (see configs/*.py): ``model`` ('mlp_moe' | 'transformer_moe'), ``shape`` and
``base_shape`` (width, expert_width, num_experts, top_k, depth), ``parameterization`` (preset name
or a table), ``constants`` ('ratio' | 'paper', with ``paper_tuned``), ``regime``,
``depth_scaling``, ``optimizer`` (name, learning_rate, ...), and the model fields
(input_dim/num_classes or vocab_size/head_dim/moe_every/ffn_width, renormalize_gates, dispatch,
capacity_factor, load_balance, exact_gelu, qk_norm_gain, compute_dtype, scan_layers, remat).
"""

from __future__ import annotations

from typing import Any

import optax
from flax import nnx

from mssp_jax import dispatch as dispatch_lib
from mssp_jax import losses, models, moe, optim, paper, presets
from mssp_jax.scaling import ConfigError, Scaling, Shape, make_scaling

MODELS = ("mlp_moe", "transformer_moe")
CONSTANTS = ("ratio", "paper")  # presets as they are (1 at the base) | the reference's constants
WARMUP_STARTS = ("zero", "reference")
SHAPE_FIELDS = {"width": "N", "expert_width": "Ne", "num_experts": "M", "top_k": "K", "depth": "L"}


def shape_from_config(fields: Any, name: str) -> Shape:
    """Reads a Shape from a ConfigDict with the SHAPE_FIELDS names; errors name the field."""
    missing = [f for f in SHAPE_FIELDS if f not in fields]
    if missing:
        raise ConfigError(f"{name} is missing {missing}; it needs {list(SHAPE_FIELDS)}")
    for f in SHAPE_FIELDS:
        value = fields[f]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}.{f} must be a positive integer, got {value!r}")
    shape = Shape(**{sym: int(fields[f]) for f, sym in SHAPE_FIELDS.items()})
    if shape.K > shape.M:
        raise ConfigError(f"{name}.top_k ({shape.K}) must be <= {name}.num_experts ({shape.M}); "
                          f"allowed: 1..{shape.M}")
    return shape


def _table(parameterization: Any) -> Any:
    return parameterization.to_dict() if hasattr(parameterization, "to_dict") else parameterization


def parameterization_table(config: Any) -> Any:
    """`config.parameterization` (a preset name or a table), or with ``constants='paper'`` the
    paper form of that preset name (`mssp_jax.paper.table`) for the config's regime and model;
    ``config.tuned`` ({role: {field: factor}}) is multiplied into its roles' `tuned` fields."""
    constants = config.get("constants", "ratio")
    if constants not in CONSTANTS:
        raise ConfigError(f"constants must be one of {list(CONSTANTS)}, got {constants!r}")
    tuned = _table(config.get("tuned", {})) or {}
    if constants == "ratio":
        table = _table(config.parameterization)
        if tuned and isinstance(table, str) and table in presets.PRESETS:
            table = {**presets.PRESETS[table], "name": table}
        return presets.with_tuned(table, tuned) if tuned else table
    if not isinstance(config.parameterization, str) or config.regime == "auto":
        raise ConfigError("constants='paper' needs parameterization to be a preset name and regime "
                          f"one of {list(paper.GATE_CONST['mlp_moe'])}, got "
                          f"{config.parameterization!r} / {config.regime!r}")
    routing = "soft" if config.shape.top_k == config.shape.num_experts else "topk"
    table = paper.table(config.parameterization, config.regime, config.optimizer.name, config.model,
                        routing=routing, tuned=config.get("paper_tuned", False),
                        family=config.get("paper_family", ""))
    return presets.with_tuned(table, tuned)


def scaling_from_config(config: Any) -> Scaling:
    """The resolved parameterization of `config` (raises ConfigError naming the field)."""
    base = shape_from_config(config.base_shape, "base_shape")
    shape = shape_from_config(config.shape, "shape")
    return make_scaling(parameterization_table(config), base, shape, regime=config.regime,
                        optimizer=config.optimizer.name, depth=config.get("depth_scaling", ""),
                        input_dim=config.get("input_dim", 0))


def check_choices(config: Any) -> None:
    """The fields that take one of a few names, checked here since their modules read them only
    mid-compute (the others: regime, parameterization, ... in `make_scaling`)."""
    choices = {"model": MODELS, "optimizer.name": presets.OPTIMIZERS,
               "dispatch": dispatch_lib.names(), "load_balance": list(moe.LOAD_BALANCE),
               "loss": losses.LOSSES, "mse_reduction": losses.MSE_REDUCTIONS,
               "aux_loss_layers": losses.AUX_LOSS_LAYERS, "compute_dtype": models.COMPUTE_DTYPES,
               "scan_layers": (False, True), "remat": list(models.REMAT_POLICIES)}
    for field, allowed in choices.items():
        block, _, name = field.rpartition(".")
        holder = config[block] if block else config
        if name in holder and holder[name] not in allowed:
            raise ConfigError(f"{field} must be one of {list(allowed)}, got {holder[name]!r}")


def validate(config: Any) -> Scaling:
    """Everything checkable before any compute; returns the Scaling."""
    check_choices(config)
    scaling = scaling_from_config(config)
    if config.model == "transformer_moe":
        head_dim, width = config.head_dim, scaling.shape.N
        if head_dim <= 0 or width % head_dim:
            raise ConfigError(f"shape.width ({width}) must be divisible by head_dim ({head_dim})")
    return scaling


def build_model(config: Any, rngs: nnx.Rngs, scaling: Scaling | None = None) -> nnx.Module:
    """The model named by `config.model`, initialised by `scaling` (default: from config)."""
    scaling = scaling or validate(config)
    common = dict(rngs=rngs, renormalize=config.get("renormalize_gates", False),
                  dispatch=dispatch_lib.from_config(config),
                  load_balance=config.get("load_balance", "switch"),
                  exact_gelu=config.get("exact_gelu", False),
                  dtype=config.get("compute_dtype", "float32"))
    if config.model == "mlp_moe":
        return models.MLPMoE(config.input_dim, config.num_classes, scaling, **common)
    return models.TransformerMoE(
        config.vocab_size, scaling, head_dim=config.head_dim, moe_every=config.get("moe_every", 1),
        ffn_width=config.get("ffn_width", 0), qk_norm_gain=config.get("qk_norm_gain", True),
        scan_layers=config.get("scan_layers", False), remat=config.get("remat", "none"), **common)


def build_schedule(config: Any) -> optax.Schedule:
    """Base-LR schedule: 'constant', or linear warmup then 'cosine' / 'linear' decay.

    The warmup starts at 0 (``warmup_start='zero'``: step t of w has lr * t / w) or, as the
    reference, at lr / (w + 1) (``'reference'``: lr * (t + 1) / (w + 1), so no step is wasted).
    """
    opt = config.optimizer
    lr, warmup, steps = opt.learning_rate, opt.get("warmup_steps", 0), config.get("steps", 1)
    kind, start = opt.get("schedule", "constant"), opt.get("warmup_start", "zero")
    if start not in WARMUP_STARTS:
        raise ConfigError(f"optimizer.warmup_start must be one of {list(WARMUP_STARTS)}, "
                          f"got {start!r}")
    end = lr * opt.get("final_lr_ratio", 0.1)
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, max(steps - warmup, 1), end / lr if lr else 0.0)
    elif kind == "linear":
        after = optax.linear_schedule(lr, end, max(steps - warmup, 1))
    else:
        raise ConfigError(f"optimizer.schedule must be one of ['constant', 'cosine', 'linear'], "
                          f"got {kind!r}")
    if not warmup:
        return after
    ramp = (optax.linear_schedule(0.0, lr, warmup) if start == "zero"
            else optax.linear_schedule(lr / (warmup + 1), lr * warmup / (warmup + 1), warmup - 1))
    return optax.join_schedules([ramp, after], [warmup])


def build_optimizer(config: Any, scaling: Scaling, model: Any) -> optax.GradientTransformation:
    """Gradient clipping (if set) followed by our per-role Adam/SGD chain."""
    opt = config.optimizer
    tx = optim.make_optimizer(scaling, model, build_schedule(config), b1=opt.get("b1", 0.9),
                              b2=opt.get("b2", 0.999), eps=opt.get("eps", 1e-8),
                              momentum=opt.get("momentum", 0.0),
                              weight_decay=opt.get("weight_decay", 0.0),
                              decay_all=opt.get("decay_all", False))
    clip = opt.get("grad_clip", 0.0)
    return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx
