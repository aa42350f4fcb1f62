"""Token-to-expert dispatch: given the routing, compute sum_k w_tk * W2_e phi(W1_e^T x_t).

Every implementation has the signature ``(x [T,N], w_up [M,N,Ne], w_down [M,Ne,N], idx [T,K],
weights [T,K], act) -> y [T,N]`` and computes the same function (tested).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Dispatch = Callable[..., jax.Array]


def dense(x: jax.Array, w_up: jax.Array, w_down: jax.Array, idx: jax.Array, weights: jax.Array,
          act: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Every expert on every token, masked by the gates: exact, simple, cost ~ M/K x active."""
    num_experts = w_up.shape[0]
    gates = jnp.zeros((x.shape[0], num_experts), weights.dtype)
    gates = gates.at[jnp.arange(x.shape[0])[:, None], idx].add(weights)  # [T, M]
    hidden = act(jnp.einsum("tn,mne->tme", x, w_up))
    return jnp.einsum("tme,men,tm->tn", hidden, w_down, gates)


_REGISTRY: dict[str, Dispatch] = {"dense": dense}


def register(name: str, fn: Dispatch) -> None:
    """Makes a dispatch implementation selectable by name (config field `dispatch`)."""
    _REGISTRY[name] = fn


def get(name: str) -> Dispatch:
    """The dispatch called `name`; 'auto' is the fastest exact one for the default backend."""
    if name == "auto":
        name = "dense"
    if name not in _REGISTRY:
        raise ValueError(f"dispatch must be one of {['auto', *_REGISTRY]}, got {name!r}")
    return _REGISTRY[name]
