"""The MoE layer: router (sigmoid gates x (K0/K)^alpha, top-K or soft) and stacked experts.

h_agg = sum_m g_m W2_m phi(W1_m^T h). Experts are stacked tensors [M, N, N_e] / [M, N_e, N]; how
tokens reach them (dense masking, sorted grouped matmuls, capacity buffers, expert parallelism)
is the `dispatch` function's business, so every dispatch computes the same function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mssp_jax import coord
from mssp_jax import dispatch as dispatch_lib
from mssp_jax.losses import router_metrics
from mssp_jax.params import labelled_param
from mssp_jax.scaling import ConfigError, Scaling

TIE_BREAK = 1e-6  # size of the rotation used to break exact router-logit ties (see `route`)


def gelu(exact: bool) -> Callable[[jax.Array], jax.Array]:
    """GELU, exact (erf, as PyTorch's default and the reference) or tanh-approximate (our default:
    cheaper; the two differ by < 1e-3 in value)."""
    return functools.partial(jax.nn.gelu, approximate=not exact)


class Routing(NamedTuple):
    """Which experts each token uses and with which weight."""

    idx: jax.Array  # [T, K] int32 expert indices
    weights: jax.Array  # [T, K] gate values (sigmoid x gate_scale, optionally renormalised)
    logits: jax.Array  # [T, M] router logits
    load: jax.Array  # [M] fraction of token slots sent to each expert (sums to 1)
    aux_loss: jax.Array  # load-balancing loss of the layer (see `LOAD_BALANCE`)


# The load-balancing loss M * sum_m load_m * p_m, with `load` the (stop-gradient) token fraction and
# p_m the mean over tokens of ...
LOAD_BALANCE = {
    # ... a softmax over all M logits (Switch Transformer; load sums to 1, p to 1): its gradient
    # per router logit falls as 1/M;
    "switch": "softmax over all M router logits",
    # ... the scaled sigmoid gates of the selected experts, 0 elsewhere, with load = tokens per
    # expert summing to K (the authors' reference): its gradient per logit does not shrink with M.
    "selected_gates": "scaled sigmoid gates of the selected experts",
}


def load_balance_loss(logits: jax.Array, idx: jax.Array, weights: jax.Array,
                      kind: str) -> jax.Array:
    """The `kind` load-balancing loss of one layer (1 when perfectly balanced, for 'switch')."""
    num_tokens, num_experts = logits.shape
    counts = jnp.zeros((num_experts,), logits.dtype).at[idx.reshape(-1)].add(1.0)
    if kind == "switch":
        load, probs = counts / idx.size, jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)
    elif kind == "selected_gates":
        load = counts / num_tokens
        gates = jnp.zeros_like(logits).at[jnp.arange(num_tokens)[:, None], idx].set(weights)
        probs = jnp.mean(gates, axis=0)
    else:
        raise ValueError(f"load_balance must be one of {list(LOAD_BALANCE)}, got {kind!r}")
    return num_experts * jnp.sum(jax.lax.stop_gradient(load) * probs)


def route(logits: jax.Array, k: int, gate_scale: float, renormalize: bool = False,
          load_balance: str = "switch") -> Routing:
    """Top-K routing with sigmoid gates.

    Exact ties (a zero-initialised router gives all-zero logits) are broken by a tiny per-token
    rotation of the expert order, so token t prefers experts t, t+1, ... and not always expert 0.
    """
    num_tokens, num_experts = logits.shape
    if k == num_experts:  # soft routing: every expert, no selection needed
        idx = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), (num_tokens, k))
        selected = logits
    else:
        rotation = ((jnp.arange(num_experts)[None, :] - jnp.arange(num_tokens)[:, None])
                    % num_experts)
        _, idx = jax.lax.top_k(jax.lax.stop_gradient(logits) - TIE_BREAK * rotation, k)
        selected = jnp.take_along_axis(logits, idx, axis=-1)
    weights = jax.nn.sigmoid(selected) * gate_scale
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    counts = jnp.zeros((num_experts,), logits.dtype).at[idx.reshape(-1)].add(1.0)
    aux_loss = load_balance_loss(logits, idx, weights, load_balance)
    return Routing(idx.astype(jnp.int32), weights, logits, counts / (num_tokens * k), aux_loss)


class MoE(nnx.Module):
    """Router + M experts (phi = GELU, tanh-approximate unless `exact_gelu`); returns
    (h_agg, Routing). The expert matmuls take `dtype` inputs; the router is float32 (its logits
    pick the top-K by small differences and feed the sigmoid gates and the balancing softmax)."""

    def __init__(self, width: int, expert_width: int, num_experts: int, top_k: int,
                 scaling: Scaling, *, rngs: nnx.Rngs, renormalize: bool = False,
                 dispatch: str | Callable = "auto", load_balance: str = "switch",
                 exact_gelu: bool = False, dtype: str = "float32"):
        if load_balance not in LOAD_BALANCE:
            raise ConfigError(f"load_balance must be one of {list(LOAD_BALANCE)}, "
                              f"got {load_balance!r}")
        self.top_k = top_k
        self.renormalize = renormalize
        self.load_balance = load_balance
        self.exact_gelu = exact_gelu
        self.gate_scale = scaling.gate_scale
        self.router = labelled_param(rngs, scaling, "router", (width, num_experts),
                                     ("embed", "expert_router"))
        self.w_up = labelled_param(rngs, scaling, "expert_up", (num_experts, width, expert_width),
                                   ("expert", "embed", "expert_mlp"))
        self.w_down = labelled_param(rngs, scaling, "expert_down",
                                     (num_experts, expert_width, width),
                                     ("expert", "expert_mlp", "embed"))
        self.router_mult = scaling.multiplier("router")
        self.up_mult = scaling.multiplier("expert_up")
        self.down_mult = scaling.multiplier("expert_down")
        self.dispatch = dispatch_lib.get(dispatch) if isinstance(dispatch, str) else dispatch
        self.dtype = jnp.dtype(dtype)

    def __call__(self, h: jax.Array) -> tuple[jax.Array, Routing]:
        lead = h.shape[:-1]
        x = h.reshape(-1, h.shape[-1])
        logits = self.coord_apply("router", self.router[...], x)
        routing = route(logits, self.top_k, self.gate_scale, self.renormalize, self.load_balance)
        w_up = (self.up_mult * self.w_up[...]).astype(self.dtype)
        w_down = (self.down_mult * self.w_down[...]).astype(self.dtype)
        y = self.dispatch(x.astype(self.dtype), w_up, w_down, routing.idx, routing.weights,
                          gelu(self.exact_gelu))
        coord.record(self, router=x, w_up=x, routing=routing, output=y,
                     w_down=lambda: self.coord_every_expert(x))  # evaluated only when recording
        return y.reshape(*lead, -1), routing

    def coord_every_expert(self, x: jax.Array) -> jax.Array:
        """Every expert's hidden units on every token [T, M, N_e] (coordinate checks)."""
        return gelu(self.exact_gelu)(self.coord_apply("w_up", self.w_up[...], x))

    def coord_apply(self, name: str, w: jax.Array, x: jax.Array) -> jax.Array:
        """Parameter `name` applied to its input: router logits [T, M], every expert's
        pre-activation [T, M, N_e], every expert's output before its gate [T, M, N]."""
        if name == "router":
            return x.astype(jnp.float32) @ (self.router_mult * w)
        x, scaled = x.astype(self.dtype), ((self.up_mult if name == "w_up" else self.down_mult)
                                            * w).astype(self.dtype)
        return jnp.einsum("tn,mne->tme" if name == "w_up" else "tme,men->tmn", x, scaled)

    def coord_observables(self, p0: dict, pt: dict, r0: dict, rt: dict) -> dict[str, jax.Array]:
        """The router's statistics now, and the aggregation h_agg = sum_m g_m W2_m e_m split into
        base sum g W2(0) e(0), propagating sum g W2(0) de, effective sum g dW2 e(0) and cross
        sum g dW2 de (g: the gates now; e(0): the experts' hidden units at W_0 on the W_0 input)."""
        routing = rt["routing"]
        gates = dispatch_lib.dense_gates(routing.idx, routing.weights, routing.logits.shape[-1])
        e0, de = r0["w_down"], rt["w_down"] - r0["w_down"]
        w0, dw = self.down_mult * p0["w_down"], self.down_mult * (pt["w_down"] - p0["w_down"])
        agg = lambda e, w: coord.rms(jnp.einsum("tme,men,tm->tn", e, w, gates))  # noqa: E731
        stats = router_metrics([routing])
        return {"router/logit_rms": coord.rms(routing.logits),
                "router/gate_entropy": stats["router_entropy"],
                "router/max_gate": stats["max_gate"],
                "router/load_max": stats["load_max"], "router/load_min": stats["load_min"],
                "h_agg/total": coord.rms(rt["output"]), "h_agg/base": agg(e0, w0),
                "h_agg/propagating": agg(de, w0), "h_agg/effective": agg(e0, dw),
                "h_agg/cross": agg(de, dw)}
