"""Fields shared by every experiment family: shapes, parameterization, optimizer, training."""

from __future__ import annotations

import ml_collections


def shape(width: int, expert_width: int, num_experts: int, top_k: int, depth: int = 1):
    """A shape block (the five size knobs)."""
    return ml_collections.ConfigDict(dict(width=width, expert_width=expert_width,
                                          num_experts=num_experts, top_k=top_k, depth=depth))


def regime_shape(base: tuple[int, int, int, int], regime: str, scale: int, depth: int = 1):
    """The shape at `scale` x the base width inside `regime`: I grows N_e, II grows M and K,
    III grows both (K/M fixed throughout)."""
    n, ne, m, k = base
    grow_ne, grow_m = regime in ("I", "III"), regime in ("II", "III")
    return shape(n * scale, ne * scale if grow_ne else ne, m * scale if grow_m else m,
                 k * scale if grow_m else k, depth)


REGIMES = ("II", "I", "III")  # a config argument's allowed values; the first is its default


def parse_args(arg: str | None, allowed: dict[str, tuple[str, ...]],
               **integers: int) -> dict[str, str | int]:
    """The config's arguments (big_vision style: 'regime=II,scale=4' after the file's ':'), every
    one present: `allowed` maps a name to its allowed values, the first the default; `integers`
    maps a name to its default, any positive integer allowed. Raises ConfigError naming the
    argument and its allowed values."""
    names = [*allowed, *integers]
    out: dict[str, str | int] = {k: v[0] for k, v in allowed.items()} | integers
    for item in arg.split(",") if arg else ():
        key, _, value = item.partition("=")
        if key in allowed and value in allowed[key]:
            out[key] = value
        elif key in integers and value.isdigit() and int(value) >= 1:
            out[key] = int(value)
        else:
            # Imported here: loading a config stays free of JAX (fast flag errors and --help).
            from mssp_jax.scaling import ConfigError

            if key not in names:
                raise ConfigError(f"config argument {item!r}: unknown name {key!r}; allowed "
                                  f"names {names} (as name=value, joined by commas)")
            values = "a positive integer" if key in integers else f"one of {list(allowed[key])}"
            raise ConfigError(f"config argument {key} must be {values}, got {value!r}")
    return out


def base_config(base_shape, *, parameterization: str = "mssp", regime: str = "II",
                optimizer: str = "adam", learning_rate: float = 1e-2):
    """The fields every config has; families add the model and data fields."""
    c = ml_collections.ConfigDict()
    c.base_shape = base_shape
    c.shape = ml_collections.ConfigDict(base_shape.to_dict())
    c.parameterization = parameterization  # a preset name (mssp_jax.presets.PRESETS) or a table
    # 'ratio': the preset as is (every constant 1 at the base shape); 'paper': the preset as the
    # authors' reference code has it, with its absolute constants (mssp_jax/paper.py)
    c.constants = "ratio"
    c.paper_tuned = False  # constants='paper' only: add the reference's tuned multipliers
    # Base-width tuned multipliers, {role: {'std' | 'mult' | 'lr' | 'eps': factor}}, multiplied into
    # the table's `tuned` fields (a multiplier sweep's best point is applied this way)
    c.tuned = ml_collections.ConfigDict()
    c.regime = regime  # 'I' | 'II' | 'III' | 'auto' (inferred from which ratios differ from 1)
    c.depth_scaling = ""  # '' (the preset's default) | 'none' | 'depth_mup' | 'completep'
    c.renormalize_gates = False
    # 'auto' | 'dense' | 'sorted' | 'ragged' | 'capacity' | 'bucketed' (mssp_jax/dispatch.py)
    c.dispatch = "auto"
    # dispatch='capacity' only (also on expert meshes): slots per expert = factor * T*K / M
    c.capacity_factor = 1.25
    # Behaviours where the reference differs from our defaults (docs/REPRODUCING.md says why):
    c.load_balance = "switch"  # 'switch' | 'selected_gates' (reference; mssp_jax/moe.py)
    c.aux_loss_layers = "mean"  # 'mean' | 'sum' (reference) over the MoE layers
    c.exact_gelu = False  # True: erf GELU (reference); False: tanh approximation
    # Matmul inputs of the hidden layers: 'float32' | 'bfloat16' (TPU/GPU); parameters, optimizer
    # state, router, norms, softmax, logits and loss stay float32 (mssp_jax/models.py)
    c.compute_dtype = "float32"
    c.optimizer = ml_collections.ConfigDict(dict(
        name=optimizer, learning_rate=learning_rate, b1=0.9, b2=0.999, eps=1e-8, momentum=0.0,
        weight_decay=0.0, grad_clip=0.0, schedule="constant", warmup_steps=0, final_lr_ratio=0.1,
        warmup_start="zero",  # 'zero' | 'reference' (lr * (t + 1) / (w + 1))
        decay_all=False))  # True: decay norm gains and biases too (reference)
    c.seed = 0
    c.steps = 500
    c.batch_size = 32
    c.quick = False  # a reduced variant for tests (families shrink their grids when set)
    # Training loop (mssp_jax/train.py, docs/PIPELINE.md); 0 disables eval / checkpoints.
    c.eval_every = 100
    c.eval_steps = 10  # eval batches per evaluation (0 = one full pass over the eval split)
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.log_every = 10
    # Device mesh (mssp_jax/sharding.py, docs/SCALING_OUT.md): axis sizes, -1 = remaining devices;
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, expert=1, tensor=1))
    # Multi-host: jax.distributed.initialize() first; empty fields are auto-detected.
    c.distributed = ml_collections.ConfigDict(dict(initialize=False, coordinator_address="",
                                                   num_processes=0, process_id=-1))
    return c
