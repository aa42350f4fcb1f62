"""The spec's scaling formulas (../shared/spec/PARAMETERIZATIONS.md), transcribed independently of
mssp_jax/presets.py so the tests compare two separate readings of the contract."""

from __future__ import annotations

import math

INPUT_LIKE = ("embedding", "input", "norm", "bias")
HIDDEN = ("attn_qkv", "attn_out", "mlp_up", "mlp_down")
MUP_FAMILY = ("mup", "mssp", "mup_global_eps", "jiang")


def std(preset: str, regime: str, role: str, s, fan_in: int) -> float:
    """Init std at absolute sizes `s` (Shape); 0 for zero and ones inits."""
    if role == "embedding":
        return 0.02
    if role in ("norm", "bias"):
        return 0.0
    if preset == "sp":
        return fan_in ** -0.5
    if role == "readout":
        return 0.0
    if role == "router":
        if preset == "jiang":
            return 1 / s.N
        if regime == "I":
            return 0.0 if preset == "mssp" else 1 / s.N
        return s.N ** -0.5
    if role == "expert_down":
        if preset == "jiang":
            return math.sqrt(s.N) / s.Ne
        if preset == "mssp" and regime == "II":
            return math.sqrt(s.M / s.Ne)
        return s.Ne ** -0.5
    return fan_in ** -0.5  # input, hidden, expert_up


def lr(preset: str, optimizer: str, role: str, r: dict[str, float]) -> float:
    """LR factor relative to the base shape (ratios r: rN, rNe, rM, rK, rL)."""
    rN, re, rM = r["rN"], r["rNe"], r["rM"]
    if preset == "sp":
        return 1 / rN if optimizer == "sgd" else 1.0
    if optimizer == "sgd":
        return {"router": rM / rN, "expert_up": rM * re / rN, "expert_down": rM * rN / re,
                "readout": 1 / rN}.get(role, rN if role in INPUT_LIKE else 1.0)
    return {"expert_down": 1 / re}.get(role, 1.0 if role in INPUT_LIKE else 1 / rN)


def eps(preset: str, optimizer: str, role: str, r: dict[str, float]) -> float:
    """Adam epsilon factor relative to the base shape."""
    if optimizer == "sgd" or preset in ("sp", "mup_global_eps", "jiang"):
        return 1.0
    rN, re, rM = r["rN"], r["rNe"], r["rM"]
    return {"router": 1 / rM, "expert_up": 1 / (re * rM), "expert_down": 1 / (rN * rM),
            "readout": 1.0}.get(role, 1 / rN)


def shared_experts(preset: str, regime: str) -> bool:
    return preset == "mssp" and regime == "III"
