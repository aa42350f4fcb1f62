"""Resolving a parameterization table at a concrete (base shape, shape, regime, optimizer).

`Scaling` is the one object the modules (init std, forward multiplier) and the optimizer (LR and
eps multipliers) ask. It is built from a preset name or from a user's own table.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from mssp_jax import presets

ABSOLUTE_SYMBOLS = ("N", "Ne", "M", "K", "L", "fan_in")
RATIO_SYMBOLS = ("rN", "rNe", "rM", "rK", "rL")
# Constants are evaluated at the base shape; d_in is the model's input feature width.
CONST_SYMBOLS = ("N", "Ne", "M", "K", "L", "d_in")
SPECIAL_INITS = ("zero", "one")


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the field and the allowed values."""


@dataclasses.dataclass(frozen=True)
class Monomial:
    """coef * prod(symbol ** exponent): the shape of every scaling rule."""

    coef: float
    exps: tuple[tuple[str, Fraction], ...]

    def exponent(self, symbol: str) -> Fraction:
        return dict(self.exps).get(symbol, Fraction(0))

    def __call__(self, values: Mapping[str, float]) -> float:
        out = self.coef
        for sym, exp in self.exps:
            out *= float(values[sym]) ** float(exp)
        return out

    def __mul__(self, other: Monomial) -> Monomial:
        exps = dict(self.exps)
        for sym, exp in other.exps:
            exps[sym] = exps.get(sym, Fraction(0)) + exp
        return Monomial(self.coef * other.coef, tuple(sorted((s, e) for s, e in exps.items() if e)))

    def __str__(self) -> str:
        parts = [f"{self.coef:g}"] if self.coef != 1 or not self.exps else []
        parts += [s if e == 1 else f"{s}^{_fmt(e)}" for s, e in self.exps]
        return "*".join(parts)


def _fmt(e: Fraction) -> str:
    return str(e.numerator) if e.denominator == 1 else f"({e})"


_FACTOR = re.compile(r"\s*([*/])?\s*([A-Za-z_]\w*|\d+(?:\.\d*)?(?:e-?\d+)?)"
                     r"(?:\s*\^\s*(\(\s*-?\d+\s*/\s*\d+\s*\)|-?\d+(?:\.\d+)?))?")


def parse_monomial(text: str, allowed: tuple[str, ...], field: str = "rule") -> Monomial:
    """Parses 'rM*rN/rNe', 'fan_in^-0.5*M^0.5', 'N^(-1/2)', '0.02', '1' into a Monomial."""
    pos, coef, exps = 0, 1.0, {}
    text = text.strip()
    while pos < len(text):
        m = _FACTOR.match(text, pos)
        if not m or (pos == 0) != (m.group(1) is None):
            raise ConfigError(f"{field}: cannot parse monomial {text!r} at position {pos}")
        sign = -1 if m.group(1) == "/" else 1
        exp = Fraction(m.group(3).strip("() ").replace(" ", "")) if m.group(3) else Fraction(1)
        atom = m.group(2)
        if atom[0].isdigit():
            coef *= float(atom) ** float(sign * exp)
        elif atom in allowed:
            exps[atom] = exps.get(atom, Fraction(0)) + sign * exp
        else:
            raise ConfigError(f"{field}: unknown symbol {atom!r} in {text!r}; "
                              f"allowed: {list(allowed)}")
        pos = m.end()
    return Monomial(coef, tuple(sorted((s, e) for s, e in exps.items() if e)))


@dataclasses.dataclass(frozen=True)
class Shape:
    """The five size knobs of an MoE model."""

    N: int  # width (d_model)
    Ne: int  # expert hidden width
    M: int  # number of experts
    K: int  # active experts per token
    L: int = 1  # depth (number of blocks)

    def validate(self, prefix: str = "") -> None:
        for name in ("N", "Ne", "M", "K", "L"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{prefix}{name} must be a positive integer, got {value!r}")
        if self.K > self.M:
            raise ConfigError(f"{prefix}K (top_k={self.K}) must be <= M (num_experts={self.M}); "
                              f"allowed: 1..{self.M}")


def infer_regime(base: Shape, shape: Shape) -> str | None:
    """I: M, K fixed; II: N_e fixed, M grows; III: N_e and M grow. None at the base shape."""
    r_ne, r_m = shape.Ne / base.Ne, shape.M / base.M
    if (shape.N, shape.Ne, shape.M, shape.K) == (base.N, base.Ne, base.M, base.K):
        return None
    if r_m == 1:
        return "I"
    return "II" if r_ne == 1 else "III"


def check_regime(regime: str, base: Shape, shape: Shape) -> None:
    """Raises if `shape` is not reachable from `base` inside `regime`."""
    if regime not in presets.REGIMES:
        raise ConfigError(f"regime must be one of {list(presets.REGIMES)} (or 'auto'), "
                          f"got {regime!r}")
    if Fraction(shape.K, shape.M) != Fraction(base.K, base.M):
        raise ConfigError(f"regime {regime} keeps the sparsity K/M fixed: "
                          f"base K/M = {base.K}/{base.M}, shape K/M = {shape.K}/{shape.M}; "
                          f"set top_k = {base.K} * M / {base.M}")
    if regime == "I" and shape.M != base.M:
        raise ConfigError(f"regime I keeps num_experts fixed: base M = {base.M}, "
                          f"shape M = {shape.M}")
    if regime == "II" and shape.Ne != base.Ne:
        raise ConfigError(f"regime II keeps expert_width fixed: base N_e = {base.Ne}, "
                          f"shape N_e = {shape.Ne}")


def _lookup(table: Mapping[str, Any], name: str, regime: str, field: str) -> Any:
    value = table[name]
    if isinstance(value, Mapping):
        if regime not in value:
            raise ConfigError(f"{field}: no rule for regime {regime!r}; given for {sorted(value)}")
        return value[regime]
    return value


def _by_regime(value: Any) -> list[tuple[str, Any]]:
    return list(value.items()) if isinstance(value, Mapping) else [("*", value)]


def _validate_constants(value: Any, field: str, numeric: bool) -> None:
    """`const` values are monomials over CONST_SYMBOLS (at the base); `tuned` values are numbers."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{field} must be a mapping with keys among "
                          f"{list(presets.CONSTANT_FIELDS)}")
    for key, entry in value.items():
        if key not in presets.CONSTANT_FIELDS:
            raise ConfigError(f"{field}: unknown key {key!r}; "
                              f"allowed: {list(presets.CONSTANT_FIELDS)}")
        for regime, text in _by_regime(entry):
            where = f"{field}.{key}" + ("" if regime == "*" else f".{regime}")
            if numeric:
                if isinstance(text, bool) or not isinstance(text, (int, float)) or not text > 0:
                    raise ConfigError(f"{where} must be a positive number, got {text!r}")
            else:
                parse_monomial(str(text), CONST_SYMBOLS, where)


def validate_table(table: Mapping[str, Any], name: str = "parameterization") -> None:
    """Checks a user table before it is used: known roles, keys and symbols only."""
    roles = table.get("roles")
    if not isinstance(roles, Mapping) or not roles:
        raise ConfigError(f"{name}: needs a non-empty 'roles' mapping; "
                          f"roles are {list(presets.ROLES)}")
    for role, rules in roles.items():
        if role not in presets.ROLES:
            raise ConfigError(f"{name}.roles: unknown role {role!r}; "
                              f"allowed: {list(presets.ROLES)}")
        for key, value in rules.items():
            if key in presets.CONSTANT_KEYS:
                _validate_constants(value, f"{name}.roles.{role}.{key}", numeric=key == "tuned")
                continue
            if key not in presets.RULE_KEYS:
                raise ConfigError(f"{name}.roles.{role}: unknown key {key!r}; "
                                  f"allowed: {list(presets.RULE_KEYS + presets.CONSTANT_KEYS)}")
            for regime, text in _by_regime(value):
                field = f"{name}.roles.{role}.{key}" + ("" if regime == "*" else f".{regime}")
                if key == "std" and text in SPECIAL_INITS:
                    continue
                parse_monomial(str(text), ABSOLUTE_SYMBOLS if key == "std" else RATIO_SYMBOLS,
                               field)
    for regime, text in _by_regime(table.get("gate_const", 1)):
        parse_monomial(str(text), CONST_SYMBOLS, f"{name}.gate_const")
    depth = table.get("depth", "none")
    if depth not in presets.DEPTH_RULES:
        raise ConfigError(f"{name}.depth must be one of {list(presets.DEPTH_RULES)}, got {depth!r}")


@dataclasses.dataclass(frozen=True)
class Scaling:
    """A parameterization resolved at one (base, shape, regime, optimizer, depth)."""

    name: str
    table: Mapping[str, Any]
    base: Shape
    shape: Shape
    regime: str
    optimizer: str
    depth: str
    input_dim: int = 0  # d_in, for constants that use it (the reference's Adam LR 1/d_in of W_in)

    @property
    def ratios(self) -> dict[str, float]:
        b, s = self.base, self.shape
        return {"rN": s.N / b.N, "rNe": s.Ne / b.Ne, "rM": s.M / b.M, "rK": s.K / b.K,
                "rL": s.L / b.L}

    def _rule(self, role: str, key: str, default: str | None = None) -> str:
        roles = self.table["roles"]
        if role not in roles:
            raise ConfigError(f"parameterization {self.name!r} has no rule for role {role!r}; "
                              f"its roles: {sorted(roles)}")
        if key not in roles[role]:
            if default is not None:
                return default
            allowed = [o for o in presets.OPTIMIZERS if f"{o}_lr" in roles[role]]
            raise ConfigError(f"parameterization {self.name!r} defines no {key!r} "
                              f"for role {role!r}; optimizer must be one of {allowed}")
        return str(_lookup(roles[role], key, self.regime, f"{self.name}.roles.{role}.{key}"))

    def _ratio_rule(self, role: str, key: str, default: str | None = None) -> Monomial:
        return parse_monomial(self._rule(role, key, default), RATIO_SYMBOLS,
                              f"{self.name}.roles.{role}.{key}")

    def _depth_factor(self, role: str, key: str) -> Monomial:
        rules = presets.DEPTH_RULES[self.depth]
        roles = presets.BRANCH_OUTPUT_ROLES if key == "branch_mult" else presets.BLOCK_ROLES
        text = rules[key] if role in roles else "1"
        return parse_monomial(text, RATIO_SYMBOLS, f"depth.{self.depth}.{key}")

    def constant(self, role: str, field: str) -> float:
        """The role's constant factor on `field` ('std' | 'mult' | 'lr' | 'eps'): its `const`
        monomial evaluated at the base shape, times its `tuned` multiplier (both default 1)."""
        rules = self.table["roles"].get(role, {})
        where = f"{self.name}.roles.{role}"
        text = _lookup(rules.get("const", {}), field, self.regime, f"{where}.const") \
            if field in rules.get("const", {}) else "1"
        tuned = _lookup(rules.get("tuned", {}), field, self.regime, f"{where}.tuned") \
            if field in rules.get("tuned", {}) else 1.0
        return self._at_base(str(text), f"{where}.const.{field}") * float(tuned)

    def _at_base(self, text: str, field: str) -> float:
        monomial = parse_monomial(text, CONST_SYMBOLS, field)
        if monomial.exponent("d_in") and not self.input_dim:
            raise ConfigError(f"{field} uses d_in but the input width is unknown; "
                              "set input_dim (make_scaling(..., input_dim=...))")
        return monomial(dataclasses.asdict(self.base) | {"d_in": self.input_dim})

    # ---- rules as monomials (what tests and `describe` compare exponents of) ----
    def std_rule(self, role: str) -> str:
        return self._rule(role, "std")

    def mult_rule(self, role: str) -> Monomial:
        return self._ratio_rule(role, "mult", "1") * self._depth_factor(role, "branch_mult")

    def lr_rule(self, role: str) -> Monomial:
        return self._ratio_rule(role, f"{self.optimizer}_lr") * self._depth_factor(
            role, f"{self.optimizer}_lr")

    def eps_rule(self, role: str) -> Monomial:
        if self.optimizer != "adam":
            return Monomial(1.0, ())
        return self._ratio_rule(role, "adam_eps", "1") * self._depth_factor(role, "adam_eps")

    # ---- numbers ----
    def init_std(self, role: str, fan_in: int) -> float:
        """The std of the sampled init (0 for the constant zero and ones inits)."""
        rule = self.std_rule(role)
        if rule in SPECIAL_INITS:
            return 0.0
        sizes = dataclasses.asdict(self.shape) | {"fan_in": fan_in}
        std = parse_monomial(rule, ABSOLUTE_SYMBOLS, f"{self.name}.roles.{role}.std")(sizes)
        return std * self.constant(role, "std")

    def multiplier(self, role: str) -> float:
        return self.mult_rule(role)(self.ratios) * self.constant(role, "mult")

    def lr_scale(self, role: str) -> float:
        """Factor on the base LR (1 at the base shape unless the table sets constants)."""
        return self.lr_rule(role)(self.ratios) * self.constant(role, "lr")

    def eps_scale(self, role: str) -> float:
        """Factor on the base Adam epsilon (1 at the base shape unless the table sets constants)."""
        if self.optimizer != "adam":
            return 1.0
        return self.eps_rule(role)(self.ratios) * self.constant(role, "eps")

    @property
    def shared_expert_init(self) -> bool:
        value = self.table.get("shared_expert_init", False)
        return bool(value[self.regime] if isinstance(value, Mapping) else value)

    @property
    def gate_scale(self) -> float:
        """gate_const * (K0/K)^alpha: the factor on every selected gate (1/M for soft routing in
        II and III); `gate_const` (default 1) is a monomial evaluated at the base shape, a table
        without `gate_alpha` does not scale its gates."""
        alpha = float(_lookup(self.table, "gate_alpha", self.regime, f"{self.name}.gate_alpha")
                      if "gate_alpha" in self.table else 0)
        const = _lookup(self.table, "gate_const", self.regime, f"{self.name}.gate_const") \
            if "gate_const" in self.table else "1"
        return (self.base.K / self.shape.K) ** alpha * self._at_base(str(const),
                                                                     f"{self.name}.gate_const")


def make_scaling(parameterization: str | Mapping[str, Any], base: Shape, shape: Shape, *,
                 regime: str = "auto", optimizer: str = "adam", depth: str = "",
                 input_dim: int = 0) -> Scaling:
    """Builds a `Scaling` from a preset name (see `presets.PRESETS`) or a user table.

    regime 'auto' infers it from which ratios differ from 1 (error at the base shape, where the
    special inits of MSSP differ per regime). depth '' takes the table's default. `input_dim` is
    needed only by tables whose constants use ``d_in``.
    """
    if isinstance(parameterization, str):
        if parameterization not in presets.PRESETS:
            raise ConfigError(f"parameterization must be one of {list(presets.PRESETS)} "
                              f"or a table, got {parameterization!r}")
        name, table = parameterization, presets.PRESETS[parameterization]
    else:
        name, table = str(parameterization.get("name", "custom")), parameterization
        validate_table(table, name)
    if optimizer not in presets.OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {list(presets.OPTIMIZERS)}, got {optimizer!r}")
    base.validate("base_")
    shape.validate()
    if regime == "auto":
        inferred = infer_regime(base, shape)
        if inferred is None:
            raise ConfigError("regime is 'auto' but the shape equals the base shape, so it "
                              f"cannot be inferred; set regime to one of {list(presets.REGIMES)}")
        regime = inferred
    check_regime(regime, base, shape)
    depth = depth or table.get("depth", "none")
    if depth not in presets.DEPTH_RULES:
        raise ConfigError(f"depth_scaling must be one of {list(presets.DEPTH_RULES)}, "
                          f"got {depth!r}")
    scaling = Scaling(name, table, base, shape, regime, optimizer, depth, input_dim)
    for role in table["roles"]:  # fail now, not mid-model, on a bad rule or constant
        scaling.lr_scale(role)
        scaling.eps_scale(role)
        scaling.multiplier(role)
    if not scaling.gate_scale > 0:
        raise ConfigError(f"{name}.gate_const must be positive, "
                          f"got gate scale {scaling.gate_scale}")
    return scaling
