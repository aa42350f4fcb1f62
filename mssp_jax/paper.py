"""The paper form: the authors' reference configurations as parameterization tables.

Source: github vankadara-lab/mssp-moe at e6b6caf (MLP: ``scaling_configs.py`` CONFIGS and
``tuned_multipliers.py``; Transformer: ``scaling.py`` and the config files). Each reference
configuration is one of our presets (the exponents are the same, tests/test_reference.py) plus
``const``: the reference's absolute formulas (LR ``1/fan_in``, eps ``1/(N M)``, ...) evaluated at
the base shape, its literal constants included (the MLP gate's ``M_base = 8``, the Transformer's
``BASE_WIDTH = 256``). So at every shape the numbers are what the reference code computes there,
also at shapes it never ran (e.g. N0 = 32 on a CPU). ``tuned`` adds its tuned multipliers.

`table(name, regime, optimizer, model)` maps our parameterization names to these configurations
(the "MSSP" of the paper is a reference config plus a flag in regimes I and III); combinations
the reference never had are derived from the nearest configuration and marked in `NOT_IN_REFERENCE`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, NamedTuple

from mssp_jax import presets
from mssp_jax.presets import with_tuned
from mssp_jax.scaling import ConfigError

ROUTINGS = ("soft", "topk")
MODELS = ("mlp_moe", "transformer_moe")


@dataclasses.dataclass(frozen=True)
class Reference:
    """One reference scaling configuration: our preset + its absolute constants."""

    preset: str
    optimizer: str  # 'sgd' | 'adam'
    regime: str
    const: dict[str, dict[str, str]]  # role -> {'lr' | 'eps': monomial at the base shape}
    # role rule overrides
    rules: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)


# ---- MLP-MoE (scaling_configs.py) -----------------------------------------------------------
# SGD LRs are written per role; every Adam config uses LR = 1/fan_in.
_MLP_ADAM_LR = {"input": "d_in^-1", "router": "N^-1", "expert_up": "N^-1",
                "expert_down": "Ne^-1", "readout": "N^-1"}
_MLP_ROLES = ("input", "router", "expert_up", "expert_down", "readout")


def _const(lr: dict[str, str], eps: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    eps = eps or {}
    return {role: {"lr": lr.get(role, "1"), "eps": eps.get(role, "1")}
            for role in set(lr) | set(eps)}


def _adam(eps: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    return _const(_MLP_ADAM_LR, eps)


MLP_REFERENCE: dict[str, Reference] = {
    "fixed_E_sp": Reference("sp", "sgd", "I", _const(dict.fromkeys(_MLP_ROLES, "N^-1"))),
    "sp_bottleneck": Reference("sp", "sgd", "II", _const(dict.fromkeys(_MLP_ROLES, "128*N^-1"))),
    "fixed_E_mup_multfree": Reference("mup", "sgd", "I", _const(
        {"input": "N", "router": "N^-1", "readout": "N^-1"})),
    "mup_bottleneck_stdinit": Reference("mup", "sgd", "II", _const(
        {"input": "N", "router": "M*N^-1", "expert_up": "M*N^-1", "expert_down": "M*N",
         "readout": "N^-1"})),
    "mup_bottleneck_ours": Reference("mssp", "sgd", "II", _const(
        {"input": "N", "router": "M*N^-1", "expert_up": "M*N^-1", "expert_down": "M*N",
         "readout": "N^-1"})),
    "mup_stdinit_allscaling_multfree": Reference("mup", "sgd", "III", _const(
        {"input": "N", "expert_up": "M", "expert_down": "M", "readout": "N^-1"})),
    "fixed_E_mup_adam": Reference("mup", "adam", "I", _adam(
        {"input": "N^-1", "expert_up": "N^-1", "expert_down": "N^-1"})),
    "fixed_E_mup_adam_globaleps": Reference("mup_global_eps", "adam", "I", _adam()),
    "mup_bottleneck_adam_stdinit_multfree": Reference("mup", "adam", "II", _adam(
        {"input": "N^-1", "router": "M^-1", "expert_up": "M^-1", "expert_down": "N^-1*M^-1"})),
    "mup_bottleneck_adam_multfree": Reference("mssp", "adam", "II", _adam(
        {"input": "N^-1", "router": "M^-1", "expert_up": "M^-1", "expert_down": "N^-1*M^-1"})),
    "mup_bottleneck_adam_globaleps_multfree": Reference("mup_global_eps", "adam", "II", _adam()),
    "mup_adam_allscaling_stdinit_ours": Reference("mup", "adam", "III", _adam(
        {"input": "N^-1", "router": "M^-1", "expert_up": "N^-1*M^-1", "expert_down": "N^-1*M^-1"})),
    "mup_adam_jiang_allscaling_multfree": Reference("jiang", "adam", "III", _adam()),
    "mup_adam_globaleps_allscaling_multfree": Reference("mup_global_eps", "adam", "III", _adam()),
}


class Tuned(NamedTuple):
    """A row of the reference's tuned_multipliers.py (its 5-D multiplier sweep's best point)."""

    base_lr: float
    init_std: float  # on every weight's init std
    lr_in: float
    lr_out: float
    lr_router: float
    lr_expert1: float
    lr_expert2: float


# Keys as the reference looks them up: '<routing>', '<routing>_no_shared' (experts not shared),
# '<routing>[_no_shared]_ll1overN' (readout std 1/N, not supported here: our paper tables zero it).
MLP_TUNED: dict[str, dict[str, Tuned]] = {
    "fixed_E_mup_multfree": {r: Tuned(0.04, 1.0, 0.016, 256.0, 1.0, 1.0, 1.0) for r in ROUTINGS},
    "fixed_E_mup_adam": {r: Tuned(0.16, 1.0, 4.0, 1.0, 1.0, 1.0, 1.0) for r in ROUTINGS},
    "mup_bottleneck_stdinit": {
        "soft": Tuned(0.01, 0.25, 0.0039, 65536.0, 64.0, 1024.0, 0.015625),
        "topk": Tuned(0.01, 1.0, 0.0039, 256.0, 64.0, 4096.0, 0.25)},
    "mup_bottleneck_ours": {r: Tuned(0.01, 0.25, 0.015625, 65536.0, 4.0, 1.0, 0.015625)
                            for r in ROUTINGS},
    "mup_bottleneck_adam_multfree": {r: Tuned(0.16, 0.25, 4.0, 4.0, 4.0, 0.25, 0.00390625)
                                     for r in ROUTINGS},
    "mup_bottleneck_adam_stdinit_multfree": {r: Tuned(0.16, 0.25, 4.0, 4.0, 4.0, 0.25, 0.00390625)
                                             for r in ROUTINGS},
    "mup_bottleneck_adam_globaleps_multfree": {r: Tuned(0.16, 1.0, 1.0, 0.25, 16.0, 1.0, 1.0)
                                               for r in ROUTINGS},
    "mup_stdinit_allscaling_multfree": {
        "soft_no_shared": Tuned(0.04, 1.0, 1.0, 0.25, 64.0, 1.0, 1.0),
        "topk_no_shared": Tuned(0.04, 1.0, 1.0, 0.25, 64.0, 1.0, 1.0),
        "soft": Tuned(0.04, 1.0, 4.0, 1.0, 16.0, 0.0625, 0.25),
        "topk": Tuned(0.04, 1.0, 0.0625, 4.0, 4.0, 1.0, 0.0625)},
    "mup_adam_allscaling_stdinit_ours": {
        "soft_no_shared": Tuned(0.16, 0.25, 1.0, 4.0, 1.0, 1.0, 1.0),
        "topk_no_shared": Tuned(0.16, 0.25, 1.0, 4.0, 1.0, 1.0, 1.0),
        "soft": Tuned(0.16, 0.25, 4.0, 64.0, 0.25, 0.25, 0.00390625),
        "topk": Tuned(0.16, 0.25, 4.0, 16.0, 0.25, 0.0625, 0.25)},
    "mup_adam_globaleps_allscaling_multfree": {r: Tuned(0.16, 1.0, 1.0, 4.0, 1.0, 1.0, 1.0)
                                               for r in ROUTINGS},
}
_MLP_TUNED_ROLE = {"input": "lr_in", "readout": "lr_out", "router": "lr_router",
                   "expert_up": "lr_expert1", "expert_down": "lr_expert2"}


def mlp_tuned(reference: str, routing: str, shared: bool) -> Tuned | None:
    """The reference's lookup: '<routing>_no_shared' when experts are not shared and that key
    exists, else '<routing>'; None when the configuration has no tuned multipliers."""
    rows = MLP_TUNED.get(reference, {})
    return rows.get(f"{routing}_no_shared") if not shared and f"{routing}_no_shared" in rows \
        else rows.get(routing)


# ---- Transformer-MoE (scaling.py) -----------------------------------------------------------
_T_MATRIX_ROLES = ("attn_qkv", "attn_out", "mlp_up", "mlp_down", "router", "expert_up",
                   "expert_down", "readout")
_T_INPUT_LIKE = ("embedding", "norm", "bias")
_T_LR = dict.fromkeys(_T_MATRIX_ROLES, "256*N^-1")  # BASE_WIDTH / n_embd


def _t_eps(**special: str) -> dict[str, str]:
    """Transformer eps: 1/n_embd for every role but those given (readout 1 in all of them)."""
    return {role: "N^-1" for role in _T_MATRIX_ROLES + _T_INPUT_LIKE} | {"readout": "1"} | special


TRANSFORMER_REFERENCE: dict[str, Reference] = {
    "StandardScaling": Reference("sp", "adam", "III", {}),
    "MupDense": Reference("mup_global_eps", "adam", "III",
                          _const(dict.fromkeys(_T_MATRIX_ROLES, "N^-1"))),
    "MupFixedE": Reference("mup", "adam", "I", _const(_T_LR, _t_eps(router="1"))),
    "MupAllScale": Reference("mup", "adam", "III", _const(_T_LR, _t_eps(
        router="M^-1", expert_up="N^-1*M^-1", expert_down="N^-1*M^-1"))),
    "MupBaselineAllScale": Reference("mup", "adam", "III", _const(_T_LR, _t_eps(
        router="M^-1", expert_up="N^-1*M^-1", expert_down="N^-1*M^-1")),
        rules={"readout": {"std": "fan_in^-1"}}),
    "MupBottleneck": Reference("mssp", "adam", "II", _const(
        _T_LR | {"expert_down": "1"},
        _t_eps(router="M^-1", expert_up="M^-1", expert_down="N^-1*M^-1"))),
    "MupBottleneckNoExpertDownInit": Reference("mup", "adam", "II", _const(
        _T_LR | {"expert_down": "1"},
        _t_eps(router="M^-1", expert_up="M^-1", expert_down="N^-1*M^-1"))),
}
# The config files' `<role>_lr_mult` / `<role>_init_mult` names -> our roles.
TRANSFORMER_MULT_ROLES = {"input": "embedding", "attn_qkv": "attn_qkv", "attn_proj": "attn_out",
                          "mlp_up": "mlp_up", "mlp_down": "mlp_down", "expert_up": "expert_up",
                          "expert_down": "expert_down", "router": "router", "output": "readout"}


@dataclasses.dataclass(frozen=True)
class NativeFamily:
    """One folder of the reference's Transformer config files (same rules, several widths)."""

    scaling: str  # a TRANSFORMER_REFERENCE key
    regime: str
    n_layer: int
    stride: int  # an MoE layer every `stride` blocks
    soft: bool  # top_k = n_exp (no aux loss)
    tied: bool  # tied_expert_init
    learning_rate: float
    widths: dict[int, tuple[int, int, int]]  # d_model -> (n_exp, top_k, expert hidden width)
    micro_batch: dict[int, int]  # d_model -> batch_size (x gradient_accumulation = 512 sequences)
    lr_mult: dict[str, float] = dataclasses.field(default_factory=dict)  # config-file role names
    init_mult: dict[str, float] = dataclasses.field(default_factory=dict)


def _widths(ratio_m: float, ratio_ne: float, k_frac: float, widths: tuple[int, ...],
            fixed_ne: int = 0) -> dict[int, tuple[int, int, int]]:
    return {n: (int(n * ratio_m), int(n * ratio_m * k_frac), fixed_ne or int(n * ratio_ne))
            for n in widths}


_BATCH = {256: 8, 384: 4, 512: 4, 768: 2, 1024: 1, 1536: 1, 2048: 1}
_BOTTLENECK_BATCH = {256: 8, 384: 8, 512: 4, 768: 2, 1024: 2, 1536: 1, 2048: 1}
_ALL_WIDTHS = (256, 384, 512, 768, 1024, 1536, 2048)
TRANSFORMER_NATIVE: dict[str, NativeFamily] = {
    "allscale/soft": NativeFamily("MupAllScale", "III", 8, 1, True, True, 7.74e-3,
                                  _widths(1 / 32, 1 / 2, 1.0, _ALL_WIDTHS), _BATCH),
    "allscale/sparse": NativeFamily(
        "MupAllScale", "III", 8, 1, False, True, 4.64159e-3,
        _widths(1 / 32, 1 / 2, 0.5, (256, 512, 1024, 2048)), _BATCH,
        lr_mult={"input": 16, "attn_qkv": 2, "attn_proj": 2, "expert_up": 2, "expert_down": 128,
                 "router": 8, "output": 8},
        init_mult={"expert_down": 4}),
    "bottleneck/soft": NativeFamily("MupBottleneck", "II", 8, 1, True, False, 7.74e-3,
                                    _widths(1 / 4, 0, 1.0, _ALL_WIDTHS, 16), _BOTTLENECK_BATCH),
    "bottleneck/sparse": NativeFamily("MupBottleneck", "II", 8, 1, False, False, 7.74e-3,
                                      _widths(1 / 4, 0, 0.5, _ALL_WIDTHS, 16), _BOTTLENECK_BATCH),
    "efficient-bottleneck/sparse-with-dense": NativeFamily(
        "MupBottleneck", "II", 4, 2, False, False, 7.74264e-3,
        _widths(1 / 8, 0, 0.5, (256, 512, 1024, 2048), 32), {256: 8, 512: 4, 1024: 2, 2048: 1},
        lr_mult={"input": 32, "attn_qkv": 4, "attn_proj": 1, "mlp_up": 2, "mlp_down": 4,
                 "expert_up": 4, "expert_down": 256, "router": 0.5, "output": 8},
        init_mult={"input": 4, "attn_qkv": 0.125, "attn_proj": 0.25, "mlp_up": 0.5, "mlp_down": 2,
                   "expert_up": 0.125, "router": 0.03125, "output": 0.25}),
}


# The gate's constant factor: the MLP divides sigmoid gates by (M / M_base)^alpha with M_base = 8
# (alpha = 0 in I); the Transformer multiplies them by (base_top_k / K)^alpha with base_top_k = 1
# and alpha = 1 in every config file, so its regime-I gates carry the constant 1/K too.
GATE_CONST = {"mlp_moe": {"I": "1", "II": "8*M^-1", "III": "8*M^-1"},
              "transformer_moe": {"I": "K^-1", "II": "K^-1", "III": "K^-1"}}


# ---- our names -> reference configurations ---------------------------------------------------
class Form(NamedTuple):
    """How one of our parameterizations is expressed with a reference configuration."""

    reference: str
    router_zero: bool = False  # MSSP regime I: the reference's --router_init zero
    shared: bool = False  # MSSP regime III: shared (tied) expert init


MLP_FORMS: dict[tuple[str, str, str], Form] = {
    ("sp", "I", "sgd"): Form("fixed_E_sp"), ("sp", "II", "sgd"): Form("sp_bottleneck"),
    ("mup", "I", "sgd"): Form("fixed_E_mup_multfree"),
    ("mssp", "I", "sgd"): Form("fixed_E_mup_multfree", router_zero=True),
    ("mup", "II", "sgd"): Form("mup_bottleneck_stdinit"),
    ("mssp", "II", "sgd"): Form("mup_bottleneck_ours"),
    ("mup", "III", "sgd"): Form("mup_stdinit_allscaling_multfree"),
    ("mssp", "III", "sgd"): Form("mup_stdinit_allscaling_multfree", shared=True),
    ("mup", "I", "adam"): Form("fixed_E_mup_adam"),
    ("mssp", "I", "adam"): Form("fixed_E_mup_adam", router_zero=True),
    ("mup_global_eps", "I", "adam"): Form("fixed_E_mup_adam_globaleps"),
    ("mup", "II", "adam"): Form("mup_bottleneck_adam_stdinit_multfree"),
    ("mssp", "II", "adam"): Form("mup_bottleneck_adam_multfree"),
    ("mup_global_eps", "II", "adam"): Form("mup_bottleneck_adam_globaleps_multfree"),
    ("mup", "III", "adam"): Form("mup_adam_allscaling_stdinit_ours"),
    ("mssp", "III", "adam"): Form("mup_adam_allscaling_stdinit_ours", shared=True),
    ("mup_global_eps", "III", "adam"): Form("mup_adam_globaleps_allscaling_multfree"),
    ("jiang", "III", "adam"): Form("mup_adam_jiang_allscaling_multfree"),
}
TRANSFORMER_FORMS: dict[tuple[str, str], Form] = {
    ("sp", "I"): Form("StandardScaling"), ("sp", "II"): Form("StandardScaling"),
    ("sp", "III"): Form("StandardScaling"),
    ("mup", "I"): Form("MupFixedE"), ("mssp", "I"): Form("MupFixedE", router_zero=True),
    ("mup", "II"): Form("MupBottleneckNoExpertDownInit"), ("mssp", "II"): Form("MupBottleneck"),
    ("mup", "III"): Form("MupAllScale"), ("mssp", "III"): Form("MupAllScale", shared=True),
}
# Combinations the reference has no configuration for, and what stands in for them.
NOT_IN_REFERENCE = {
    ("mlp_moe", "sp", "adam"): "SP with one global Adam LR and eps (constants 1)",
    ("mlp_moe", "sp", "sgd", "III"): "fixed_E_sp's LR 1/N",
    ("mlp_moe", "jiang", "adam", "I"): "mup_adam_jiang_allscaling_multfree's formulas",
    ("mlp_moe", "jiang", "adam", "II"): "mup_adam_jiang_allscaling_multfree's formulas",
    ("transformer_moe", "mssp", "adam", "I"): "MupFixedE with the router initialised to zero",
    ("transformer_moe", "mup_global_eps", "adam"): "the muP configuration with eps constants 1",
}


def reference_table(ref: Reference, model: str, *, router_zero: bool = False,
                    shared: bool = False, name: str = "") -> dict[str, Any]:
    """Our preset `ref.preset` with the reference's constants (and flags) written in; only the
    reference's optimizer has an LR rule, so using the table with the other one is an error."""
    table = copy.deepcopy(presets.PRESETS[ref.preset])
    table["name"] = name or f"paper:{ref.preset}"
    table["description"] = f"paper form: {table['description']}"
    other = {"sgd": "adam_lr", "adam": "sgd_lr"}[ref.optimizer]
    for role, rules in table["roles"].items():
        rules.pop(other, None)
        rules.update(ref.rules.get(role, {}))
        if role in ref.const:
            rules["const"] = dict(ref.const[role])
    table["gate_const"] = dict(GATE_CONST[model])
    table["shared_expert_init"] = shared
    if router_zero:
        table["roles"]["router"]["std"] = "zero"
    return table


def mlp_tuned_factors(row: Tuned) -> dict[str, dict[str, float]]:
    """A tuned_multipliers row as `tuned` fields (init_std_mult acts on every weight)."""
    return {role: {"lr": getattr(row, key), "std": row.init_std}
            for role, key in _MLP_TUNED_ROLE.items()}


def transformer_tuned_factors(family: NativeFamily) -> dict[str, dict[str, float]]:
    """A config file's multipliers as `tuned` fields."""
    out: dict[str, dict[str, float]] = {}
    for name, factor in family.lr_mult.items():
        out.setdefault(TRANSFORMER_MULT_ROLES[name], {})["lr"] = float(factor)
    for name, factor in family.init_mult.items():
        out.setdefault(TRANSFORMER_MULT_ROLES[name], {})["std"] = float(factor)
    return out


def _derived(model: str, name: str, regime: str, optimizer: str) -> Form:
    """The stand-in of NOT_IN_REFERENCE for a combination without a reference configuration."""
    if model == "mlp_moe" and name == "sp":
        return Form("fixed_E_sp")
    if model == "mlp_moe" and name == "jiang":
        return Form("mup_adam_jiang_allscaling_multfree")
    if model == "transformer_moe" and name == "mup_global_eps":
        return TRANSFORMER_FORMS[("mup", regime)]
    raise ConfigError(f"parameterization {name!r} has no paper form for {model} in regime {regime} "
                      f"with {optimizer}; paper forms: mlp_moe {sorted(MLP_FORMS)}, "
                      f"transformer_moe (adam) {sorted(TRANSFORMER_FORMS)}")


# The Transformer config family whose tuned multipliers `table(..., tuned=True)` uses by default.
DEFAULT_FAMILY = {"II": "bottleneck/sparse", "III": "allscale/sparse"}


def table(name: str, regime: str, optimizer: str, model: str = "mlp_moe", *,
          routing: str = "topk", tuned: bool = False, family: str = "") -> dict[str, Any]:
    """The paper-form table of our parameterization `name` in `regime` with `optimizer`.

    `tuned` adds the reference's tuned multipliers: MLP, tuned_multipliers.py's row for `routing`;
    Transformer, the multipliers of the config `family` (default `DEFAULT_FAMILY[regime]`).
    """
    if model not in MODELS:
        raise ConfigError(f"model must be one of {list(MODELS)}, got {model!r}")
    if routing not in ROUTINGS:
        raise ConfigError(f"routing must be one of {list(ROUTINGS)}, got {routing!r}")
    if model == "mlp_moe":
        form = MLP_FORMS.get((name, regime, optimizer))
    else:
        form = TRANSFORMER_FORMS.get((name, regime)) if optimizer == "adam" else None
    form = form or _derived(model, name, regime, optimizer)
    refs = MLP_REFERENCE if model == "mlp_moe" else TRANSFORMER_REFERENCE
    ref = refs[form.reference]
    if model == "mlp_moe" and name == "sp" and optimizer == "adam":
        ref = dataclasses.replace(ref, optimizer="adam", const={})
    if model == "transformer_moe" and name == "mup_global_eps":
        ref = dataclasses.replace(ref, preset="mup_global_eps",
                                  const={r: {"lr": c["lr"]} for r, c in ref.const.items()})
    out = reference_table(ref, model, router_zero=form.router_zero, shared=form.shared,
                          name=f"paper:{name}")
    out["reference"] = form.reference
    if not tuned:
        return out
    if model == "mlp_moe":
        row = mlp_tuned(form.reference, routing, form.shared)
        return with_tuned(out, mlp_tuned_factors(row)) if row else out
    family = family or DEFAULT_FAMILY.get(regime, "")
    if family not in TRANSFORMER_NATIVE:
        raise ConfigError(f"paper_family must be one of {list(TRANSFORMER_NATIVE)}, got {family!r}")
    return with_tuned(out, transformer_tuned_factors(TRANSFORMER_NATIVE[family]))
