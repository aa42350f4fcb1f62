"""The parameterizations, as data: one table per preset.

Every rule is a monomial string (see `mssp_jax.scaling.parse_monomial`):
  * ``std`` uses absolute sizes ``N, Ne, M, K, L, fan_in`` (``fan_in`` excludes the expert and
    layer axes) or the words ``zero`` / ``one``;
  * ``mult``, ``sgd_lr``, ``adam_lr``, ``adam_eps`` use ratios to the base shape
    ``rN, rNe, rM, rK, rL``, so they are 1 at the base shape and base-tuned constants transfer.
A value may be a dict keyed by regime (``"I"``, ``"II"``, ``"III"``) when the rule differs by
regime.
A table may omit an optimizer's keys (``jiang`` has no SGD rule); using it then is an error.

Constants on top of the exponents (all default 1, so these presets are 1 at the base shape):
  * ``const``: per role, ``{"std" | "mult" | "lr" | "eps": monomial}`` over ``N, Ne, M, K, L, d_in``
    evaluated at the *base* shape: the rule's value there in an absolute form (the reference's
    Adam LR ``1/fan_in`` of the router is ``"N^-1"``); `mssp_jax.paper` sets these;
  * ``tuned``: per role, the same keys with plain numbers: base-width tuned multipliers (what a
    multiplier sweep finds and writes);
  * ``gate_const`` (table level): a monomial at the base shape multiplying ``(K0/K)^alpha``.

Where is the MSSP rule for expert_down under Adam?  ``MSSP["roles"]["expert_down"]``.
Sources: ../shared/spec/PARAMETERIZATIONS.md, checked against the authors' reference dumps.
"""

from __future__ import annotations

import copy
from typing import Any

ROLES = (
    "embedding", "input", "attn_qkv", "attn_out", "mlp_up", "mlp_down", "router",
    "expert_up", "expert_down", "readout", "norm", "bias",
)
# Roles whose weights sit inside a residual block (depth scaling applies to them) ...
BLOCK_ROLES = ("attn_qkv", "attn_out", "mlp_up", "mlp_down", "router", "expert_up", "expert_down")
# ... and the ones that end a residual branch (the branch multiplier is carried by these).
BRANCH_OUTPUT_ROLES = ("attn_out", "mlp_down", "expert_down")
REGIMES = ("I", "II", "III")
OPTIMIZERS = ("sgd", "adam")
RULE_KEYS = ("std", "mult", "sgd_lr", "adam_lr", "adam_eps")
CONSTANT_KEYS = ("const", "tuned")  # per-role constant factors (see the module docstring)
CONSTANT_FIELDS = ("std", "mult", "lr", "eps")

# Dense hidden matrices under muP: std fan_in^-1/2, SGD LR constant, Adam LR and eps 1/width.
_MUP_HIDDEN = {"std": "fan_in^-0.5", "sgd_lr": "1", "adam_lr": "rN^-1", "adam_eps": "rN^-1"}
# Vector-like parameters (and the embedding) are input-like: SGD LR ~ width, Adam LR constant.
_MUP_INPUT_LIKE = {"sgd_lr": "rN", "adam_lr": "1", "adam_eps": "rN^-1"}

MUP: dict[str, Any] = {
    "description": "muP for MoE (dense muP is its M-free special case)",
    "gate_alpha": {"I": 0, "II": 1, "III": 1},
    "shared_expert_init": False,
    "depth": "none",
    "roles": {
        "embedding": {"std": "0.02", **_MUP_INPUT_LIKE},
        "input": {"std": "fan_in^-0.5", **_MUP_INPUT_LIKE},
        "attn_qkv": dict(_MUP_HIDDEN),
        "attn_out": dict(_MUP_HIDDEN),
        "mlp_up": dict(_MUP_HIDDEN),
        "mlp_down": dict(_MUP_HIDDEN),
        "router": {
            "std": {"I": "fan_in^-1", "II": "fan_in^-0.5", "III": "fan_in^-0.5"},
            "sgd_lr": "rM/rN", "adam_lr": "rN^-1", "adam_eps": "rM^-1",
        },
        "expert_up": {
            "std": "fan_in^-0.5", "sgd_lr": "rM*rNe/rN", "adam_lr": "rN^-1",
            "adam_eps": "rNe^-1*rM^-1",
        },
        "expert_down": {
            "std": "fan_in^-0.5", "sgd_lr": "rM*rN/rNe", "adam_lr": "rNe^-1",
            "adam_eps": "rN^-1*rM^-1",
        },
        "readout": {"std": "zero", "sgd_lr": "rN^-1", "adam_lr": "rN^-1", "adam_eps": "1"},
        "norm": {"std": "one", **_MUP_INPUT_LIKE},
        "bias": {"std": "zero", **_MUP_INPUT_LIKE},
    },
}


def with_tuned(table: dict[str, Any], tuned: dict[str, dict[str, float]]) -> dict[str, Any]:
    """`table` with `tuned` ({role: {'std' | 'mult' | 'lr' | 'eps': factor}}) multiplied into its
    roles' ``tuned`` fields: how base-width tuning (a multiplier sweep's best point) is stored."""
    table = copy.deepcopy(table)
    for role, factors in tuned.items():
        entry = table["roles"][role].setdefault("tuned", {})
        for field, factor in factors.items():
            entry[field] = float(entry.get(field, 1.0)) * float(factor)
    return table


def _derive(base: dict[str, Any], description: str, roles: dict[str, dict[str, Any]] | None = None,
            **fields: Any) -> dict[str, Any]:
    """A preset that differs from `base` in a few fields or role rules."""
    table = copy.deepcopy(base)
    table.update(description=description, **fields)
    for role, rules in (roles or {}).items():
        table["roles"][role].update(rules)
    return table


# MSSP = muP + one change per regime: I zero router; II expert_down x sqrt(M); III shared experts.
MSSP = _derive(
    MUP, "Maximally Scale-Stable Parameterization (muP for MoE + one init change per regime)",
    roles={
        "router": {"std": {"I": "zero", "II": "fan_in^-0.5", "III": "fan_in^-0.5"}},
        "expert_down": {"std": {"I": "fan_in^-0.5", "II": "fan_in^-0.5*M^0.5",
                                "III": "fan_in^-0.5"}},
    },
    shared_expert_init={"I": False, "II": False, "III": True},
)

MUP_GLOBAL_EPS = _derive(
    MUP, "muP for MoE with one constant Adam epsilon (baseline)",
    roles={role: {"adam_eps": "1"} for role in ROLES},
)

SP = {
    "description": "standard parameterization: fan_in^-1/2 init, one global LR, constant eps",
    "gate_alpha": {"I": 0, "II": 1, "III": 1},
    "shared_expert_init": False,
    "depth": "none",
    "roles": {
        role: {
            "std": {"embedding": "0.02", "norm": "one", "bias": "zero"}.get(role, "fan_in^-0.5"),
            "sgd_lr": "rN^-1", "adam_lr": "1", "adam_eps": "1",
        }
        for role in ROLES
    },
}

# Jiang, Bordelon, Pehlevan, Hanin (arXiv 2601.20205), Table 1; Adam only, global eps, CompleteP.
JIANG = _derive(
    MUP_GLOBAL_EPS, "Jiang et al. 2026 MoE transfer rules (Adam only, 1/K gate, CompleteP depth)",
    roles={
        "router": {"std": "fan_in^-1"},
        "expert_down": {"std": "N^0.5*fan_in^-1"},
    },
    gate_alpha={"I": 1, "II": 1, "III": 1},
    depth="completep",
)
for _rules in JIANG["roles"].values():
    del _rules["sgd_lr"]

PRESETS: dict[str, dict[str, Any]] = {
    "sp": SP, "mup": MUP, "mssp": MSSP, "mup_global_eps": MUP_GLOBAL_EPS, "jiang": JIANG,
}

# Depth scaling: the branch multiplier goes on BRANCH_OUTPUT_ROLES; LR/eps factors on BLOCK_ROLES.
# Measured (docs/RESULTS.md "Depth", Adam, L 2 -> 16): completep transfers (optimal LR drift 0) and
# improves with depth; depth_mup improves too but its Adam LR L^-1/2 drifts the optimum 2 grid
# steps.
DEPTH_RULES: dict[str, dict[str, str]] = {
    "none": {"branch_mult": "1", "sgd_lr": "1", "adam_lr": "1", "adam_eps": "1"},
    "depth_mup": {"branch_mult": "rL^-0.5", "sgd_lr": "1", "adam_lr": "rL^-0.5", "adam_eps": "1"},
    "completep": {"branch_mult": "rL^-1", "sgd_lr": "1", "adam_lr": "1", "adam_eps": "rL^-1"},
}
