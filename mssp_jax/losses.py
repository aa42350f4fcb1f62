"""Training objectives: MSE / cross-entropy for the MLP-MoE, next-token CE for the Transformer-MoE.

`loss_fn(model, batch, config)` returns ``(loss, metrics)``; the loss includes the load-balancing
term (``aux_loss_weight`` x the layers' losses, averaged or, as the reference, summed over MoE
layers: ``aux_loss_layers``) when the config sets a weight. The mean keeps the weight's meaning
independent of depth; the sum grows with the number of MoE layers. The MLP-MoE's metrics include
its classification accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

if TYPE_CHECKING:  # moe.py uses router_metrics (coordinate checks)
    from mssp_jax.moe import Routing


def stack_layers(routings: Routing | Sequence[Routing]) -> Routing:
    """The MoE layers' routings as one Routing whose fields have a leading layer axis: from a
    list with one Routing per layer (unrolled blocks), from one already stacked over the layers
    (scanned blocks, `load` [layers, M]), or from a list mixing both."""
    parts = [routings] if hasattr(routings, "_fields") else list(routings)  # one NamedTuple
    lifted = [r if r.load.ndim == 2 else jax.tree.map(lambda a: a[None], r) for r in parts]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *lifted)


def router_metrics(routings: Routing | Sequence[Routing]) -> dict[str, jax.Array]:
    """Mean over MoE layers: Switch loss, per-expert load (max / min), gate entropy; none for a
    model without MoE layers (a dense-FFN Transformer)."""
    if not routings:  # no MoE layer (a Routing itself is a non-empty NamedTuple)
        return {}
    r = stack_layers(routings)
    probs = jnp.mean(jax.nn.softmax(r.logits, -1), -2)  # [layers, M]
    return {
        "aux_loss": jnp.mean(r.aux_loss),
        "aux_loss_sum": jnp.sum(r.aux_loss),
        "load_max": jnp.mean(jnp.max(r.load, -1)),
        "load_min": jnp.mean(jnp.min(r.load, -1)),
        "router_entropy": jnp.mean(-jnp.sum(probs * jnp.log(probs + 1e-12), -1)),
        "max_gate": jnp.mean(jnp.max(r.weights, (-2, -1))),
    }


LOSSES = ("mse", "cross_entropy")  # the MLP-MoE's ``loss``
MSE_REDUCTIONS = ("sum", "mean")  # over the classes of one example; batches are always averaged
AUX_LOSS_LAYERS = ("mean", "sum")


def task_loss(outputs: jax.Array, targets: jax.Array, kind: str,
              mse_reduction: str = "sum") -> jax.Array:
    """'mse' against one-hot targets (scalar +-1 targets when outputs have one column) or
    'cross_entropy'. The one-hot MSE sums the squared errors over classes ('sum') or averages
    them ('mean', PyTorch's mse_loss as the reference uses: the loss and SGD gradients 1/C as
    large).
    """
    if kind == "cross_entropy":
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outputs, targets))
    if kind == "mse":
        if outputs.shape[-1] == 1:
            return jnp.mean(jnp.square(outputs[..., 0] - targets))
        onehot = jax.nn.one_hot(targets, outputs.shape[-1], dtype=outputs.dtype)
        per_class = jnp.square(outputs - onehot)
        if mse_reduction not in MSE_REDUCTIONS:
            raise ValueError(f"mse_reduction must be one of {list(MSE_REDUCTIONS)}, "
                             f"got {mse_reduction!r}")
        return jnp.mean(jnp.sum(per_class, -1) if mse_reduction == "sum" else per_class)
    raise ValueError(f"loss must be one of {list(LOSSES)}, got {kind!r}")


def accuracy(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Fraction classified correctly: the largest output, or for one output (+-1 targets) its
    sign."""
    if outputs.shape[-1] == 1:
        return jnp.mean(jnp.sign(outputs[..., 0]) == targets)
    return jnp.mean(jnp.argmax(outputs, -1) == targets)


def loss_fn(model: Any, batch: dict[str, jax.Array], config: Any) -> tuple[jax.Array, dict]:
    """The objective of `config.model` on `batch` ({'inputs', 'targets'})."""
    outputs, routings = model(batch["inputs"])
    if config.model == "transformer_moe":
        loss = task_loss(outputs, batch["targets"], "cross_entropy")
    else:
        loss = task_loss(outputs, batch["targets"], config.get("loss", "mse"),
                         config.get("mse_reduction", "sum"))
    metrics = {"task_loss": loss, **router_metrics(routings)}
    if config.model != "transformer_moe":  # the MLP-MoE classifies
        metrics["accuracy"] = accuracy(outputs, batch["targets"])
    weight = config.get("aux_loss_weight", 0.0) if routings else 0.0
    if not weight:
        return loss, metrics
    aux = metrics["aux_loss_sum" if config.get("aux_loss_layers", "mean") == "sum" else "aux_loss"]
    return loss + weight * aux, metrics
