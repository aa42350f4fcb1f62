"""The MoE layer: router (sigmoid gates x (K0/K)^alpha, top-K or soft) and stacked experts.

h_agg = sum_m g_m W2_m phi(W1_m^T h). Experts are stacked tensors [M, N, N_e] / [M, N_e, N]; how
tokens reach them (dense masking, sorted grouped matmuls, capacity buffers, expert parallelism)
is the `dispatch` function's business, so every dispatch computes the same function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mssp_jax import dispatch as dispatch_lib
from mssp_jax.params import labelled_param
from mssp_jax.scaling import Scaling

TIE_BREAK = 1e-6  # size of the rotation used to break exact router-logit ties (see `route`)


class Routing(NamedTuple):
    """Which experts each token uses and with which weight."""

    idx: jax.Array  # [T, K] int32 expert indices
    weights: jax.Array  # [T, K] gate values (sigmoid x gate_scale, optionally renormalised)
    logits: jax.Array  # [T, M] router logits
    load: jax.Array  # [M] fraction of token slots sent to each expert (sums to 1)
    aux_loss: jax.Array  # Switch load-balancing loss (1 when perfectly balanced)


def route(logits: jax.Array, k: int, gate_scale: float, renormalize: bool = False) -> Routing:
    """Top-K routing with sigmoid gates.

    Exact ties (a zero-initialised router gives all-zero logits) are broken by a tiny per-token
    rotation of the expert order, so token t prefers experts t, t+1, ... and not always expert 0.
    """
    num_tokens, num_experts = logits.shape
    if k == num_experts:  # soft routing: every expert, no selection needed
        idx = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), (num_tokens, k))
        selected = logits
    else:
        rotation = (jnp.arange(num_experts)[None, :] - jnp.arange(num_tokens)[:, None]) % num_experts
        _, idx = jax.lax.top_k(jax.lax.stop_gradient(logits) - TIE_BREAK * rotation, k)
        selected = jnp.take_along_axis(logits, idx, axis=-1)
    weights = jax.nn.sigmoid(selected) * gate_scale
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    counts = jnp.zeros((num_experts,), logits.dtype).at[idx.reshape(-1)].add(1.0)
    load = counts / (num_tokens * k)
    probs = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)
    aux_loss = num_experts * jnp.sum(jax.lax.stop_gradient(load) * probs)
    return Routing(idx.astype(jnp.int32), weights, logits, load, aux_loss)


class MoE(nnx.Module):
    """Router + M experts (phi = GELU); returns (h_agg, Routing)."""

    def __init__(self, width: int, expert_width: int, num_experts: int, top_k: int,
                 scaling: Scaling, *, rngs: nnx.Rngs, renormalize: bool = False,
                 dispatch: str | Callable = "auto"):
        self.top_k = top_k
        self.renormalize = renormalize
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

    def __call__(self, h: jax.Array) -> tuple[jax.Array, Routing]:
        lead = h.shape[:-1]
        x = h.reshape(-1, h.shape[-1])
        logits = x @ (self.router_mult * self.router[...])
        routing = route(logits, self.top_k, self.gate_scale, self.renormalize)
        w_up = self.up_mult * self.w_up[...]
        w_down = self.down_mult * self.w_down[...]
        y = self.dispatch(x, w_up, w_down, routing.idx, routing.weights, jax.nn.gelu)
        return y.reshape(*lead, -1), routing
