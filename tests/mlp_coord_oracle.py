"""The MLP-MoE coordinate check as it was first implemented: a hand-written copy of the model's
forward pass keeping every role's input (the oracle `mssp_jax.coord` is tested against; the
library itself measures from the layers' own records)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mssp_jax import factory, losses, vmap_train
from mssp_jax.coord import rms
from mssp_jax.moe import route


def forward_terms(p: Any, x: jax.Array, scaling: Any, top_k: int, renormalize: bool) -> dict:
    """The MLP-MoE forward pass, keeping each role's input and the per-expert tensors."""
    mult = scaling.multiplier
    h = jax.nn.gelu(x @ (mult("input") * p["w_in"]["kernel"]))
    logits = h @ (mult("router") * p["moe"]["router"])
    routing = route(logits, top_k, scaling.gate_scale, renormalize)
    tokens = jnp.arange(x.shape[0])[:, None]
    gates = jnp.zeros(logits.shape, logits.dtype).at[tokens, routing.idx].add(routing.weights)
    w_up = mult("expert_up") * p["moe"]["w_up"]
    w_down = mult("expert_down") * p["moe"]["w_down"]
    e = jax.nn.gelu(jnp.einsum("tn,mne->tme", h, w_up))
    h_agg = jnp.einsum("tme,men,tm->tn", e, w_down, gates)
    out = h_agg @ (mult("readout") * p["w_out"]["kernel"])
    return {"x": x, "h": h, "logits": logits, "routing": routing, "gates": gates, "e": e,
            "h_agg": h_agg, "out": out, "w_up": w_up, "w_down": w_down}


# role -> (parameter path, name of the role's input in forward_terms, einsum applying the kernel)
ROLE_KERNELS = {
    "input": (("w_in", "kernel"), "x", "tn,nd->td"),
    "router": (("moe", "router"), "h", "tn,nm->tm"),
    "expert_up": (("moe", "w_up"), "h", "tn,mne->tme"),
    "expert_down": (("moe", "w_down"), "e", "tme,men->tmn"),
    "readout": (("w_out", "kernel"), "h_agg", "tn,nc->tc"),
}


def _get(p: Any, path: tuple[str, str]) -> jax.Array:
    return p[path[0]][path[1]]


def observables(p0: Any, pt: Any, grads: Any, x: jax.Array, scaling: Any, top_k: int,
                renormalize: bool) -> dict[str, jax.Array]:
    """Every observable (a scalar) at one step (p0: initial params, pt: current params, grads at
    pt)."""
    f0 = forward_terms(p0, x, scaling, top_k, renormalize)
    ft = forward_terms(pt, x, scaling, top_k, renormalize)
    obs = {}
    for role, (path, inp, eq) in ROLE_KERNELS.items():
        w0, wt = _get(p0, path), _get(pt, path)
        obs[f"{role}/activation"] = rms(jnp.einsum(eq, ft[inp], wt))
        obs[f"{role}/effective_update"] = rms(jnp.einsum(eq, ft[inp], wt - w0))
        obs[f"{role}/propagating_update"] = rms(jnp.einsum(eq, ft[inp] - f0[inp], w0))
        obs[f"{role}/grad"] = rms(_get(grads, path))
        obs[f"{role}/weight_change"] = rms(wt - w0)
    routing = ft["routing"]
    metrics = losses.router_metrics([routing])
    obs.update({"router/logit_rms": rms(ft["logits"]),
                "router/gate_entropy": metrics["router_entropy"],
                "router/max_gate": metrics["max_gate"], "router/load_max": metrics["load_max"],
                "router/load_min": metrics["load_min"]})
    g, e0, de = ft["gates"], f0["e"], ft["e"] - f0["e"]
    w2_0, dw2 = f0["w_down"], ft["w_down"] - f0["w_down"]
    agg = lambda e, w: jnp.einsum("tme,men,tm->tn", e, w, g)  # noqa: E731
    obs.update({"h_agg/total": rms(ft["h_agg"]), "h_agg/base": rms(agg(e0, w2_0)),
                "h_agg/propagating": rms(agg(de, w2_0)), "h_agg/effective": rms(agg(e0, dw2)),
                "h_agg/cross": rms(agg(de, dw2))})
    return obs


def measure(config: Any, data: dict, seeds: Any) -> dict[int, dict[str, float]]:
    """Trains `config` from each seed at its base LR (online; scans between the recorded steps,
    all in one compiled program vmapped over seeds) and
    returns the seed-mean observables at each of `coord.record_steps`."""
    scaling = factory.validate(config)
    t = vmap_train.trainable(config, seeds)
    lr, record = config.optimizer.learning_rate, sorted(config.coord.record_steps)
    probe = jax.tree.map(jnp.asarray, data["eval"])
    bsz = config.batch_size
    batches = jax.tree.map(lambda a: jnp.asarray(a[: record[-1] * bsz]).reshape(
        record[-1], bsz, *a.shape[1:]), data["train"])

    def step(carry, batch):
        p, opt_state = carry
        updates, opt_state = t.tx.update(jax.grad(t.loss)(p, batch), opt_state, p)
        return (optax.apply_updates(p, jax.tree.map(lambda u: lr * u, updates)), opt_state), None

    def one_seed(p0, batches):
        carry, prev, out = (p0, t.tx.init(p0)), 0, []
        for r in record:
            if r > prev:
                carry, _ = jax.lax.scan(step, carry, jax.tree.map(lambda a: a[prev:r], batches))
                prev = r
            grads = jax.grad(t.loss)(carry[0], probe)
            out.append(observables(p0, carry[0], grads, probe["inputs"], scaling,
                                   scaling.shape.K, config.get("renormalize_gates", False)))
        return out

    per_seed = jax.jit(jax.vmap(one_seed, in_axes=(0, None)))(t.params, batches)
    return {r: {k: float(jnp.mean(v)) for k, v in obs.items()} for r, obs in zip(record, per_seed)}
