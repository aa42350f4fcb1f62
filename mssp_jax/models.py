"""The paper's two models, built from role-labelled parameters.

* `MLPMoE`: h = phi(W_in x); h_agg = MoE(h); f = W_out^T h_agg   (phi = GELU, no biases).
* `TransformerMoE`: decoder-only, pre-RMSNorm, QK-norm, RoPE, causal attention, an MoE FFN every
  `moe_every`-th block (dense FFN in the others), untied lm_head.
Both return ``(output, routings)``: a list with one `moe.Routing` per MoE layer or, from a scanned
Transformer, one Routing stacked over its layers (`losses.stack_layers` reads either).

Mixed precision (``compute_dtype``): parameters (and so the optimizer state) stay float32, the
master copies; the matmuls of the hidden layers take their inputs and weights in the compute dtype.
Kept in float32: the router (its logits decide the top-K by small differences, and feed a sigmoid
and the load-balancing softmax), the norms (a mean of squares and a division), the attention
softmax, RoPE (angles up to seq_len radians lose their phase in 8 mantissa bits), the output logits
and the loss (exp / normalisation over the vocabulary). The residual stream is float32: each block's
bfloat16 output is added to it in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec

from mssp_jax import coord
from mssp_jax.dispatch import Dispatch
from mssp_jax.labelling import NNX_STACKED_LAYERS
from mssp_jax.moe import MoE, Routing, gelu
from mssp_jax.params import labelled_param
from mssp_jax.scaling import ConfigError, Scaling


COMPUTE_DTYPES = ("float32", "bfloat16")
ACTIVATION_AXES = ("batch", None, None)  # [B, T, N] between blocks: split like the batch only


def constrain(x: jax.Array, axes: tuple[str | None, ...] = ACTIVATION_AXES) -> jax.Array:
    """Pins activation `x` to the mesh axes its logical `axes` map to under the mesh and rules a
    training step is traced with (`sharding.activation_rules`); unchanged outside one. Left to
    itself XLA may give an activation a layout it can only leave by replicating it (an embedding
    lookup from a table split on `embed` comes out split on `embed`, not on the batch): XLA's
    "involuntary full rematerialization"."""
    rules = spmd.get_logical_axis_rules()
    if not rules or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(
        x, PartitionSpec(*spmd.from_sharding_rules(axes, rules)))


def compute_dtype(name: str) -> jnp.dtype:
    """The dtype named by the ``compute_dtype`` field (one of `COMPUTE_DTYPES`)."""
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"compute_dtype must be one of {list(COMPUTE_DTYPES)}, got {name!r}")
    return jnp.dtype(name)


class Linear(nnx.Module):
    """y = x @ (mult * W), with W labelled by `role`; the product taken in `dtype` (W stays
    float32)."""

    def __init__(self, fan_in: int, fan_out: int, role: str, axes: tuple[str, str],
                 scaling: Scaling, *, rngs: nnx.Rngs, dtype: str = "float32"):
        self.kernel = labelled_param(rngs, scaling, role, (fan_in, fan_out), axes)
        self.mult = scaling.multiplier(role)
        self.dtype = compute_dtype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        coord.record(self, kernel=x)
        return self.coord_apply("kernel", self.kernel[...], x)

    def coord_apply(self, name: str, w: jax.Array, x: jax.Array) -> jax.Array:
        """The kernel `w` applied to `x` (the forward pass; `mssp_jax.coord` replays it)."""
        return x.astype(self.dtype) @ (self.mult * w).astype(self.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned gain (role `norm`), or without one (`gain=False`); float32 whatever
    the input's dtype."""

    def __init__(self, dim: int, scaling: Scaling, axis_name: str, *, rngs: nnx.Rngs,
                 eps: float = 1e-6, gain: bool = True):
        self.scale = labelled_param(rngs, scaling, "norm", (dim,), (axis_name,)) if gain else None
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        normed = x / jnp.sqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        if self.scale is None:
            return normed
        coord.record(self, scale=normed)
        return self.coord_apply("scale", self.scale[...], normed)

    def coord_apply(self, name: str, w: jax.Array, x: jax.Array) -> jax.Array:
        """The gain `w` applied to the normalised `x`."""
        return x * w


class MLPMoE(nnx.Module):
    """The paper's MLP-MoE: W_in -> router + experts -> W_out."""

    def __init__(self, input_dim: int, output_dim: int, scaling: Scaling, *, rngs: nnx.Rngs,
                 renormalize: bool = False, dispatch: str | Dispatch = "auto",
                 load_balance: str = "switch", exact_gelu: bool = False, dtype: str = "float32"):
        s = scaling.shape
        self.w_in = Linear(input_dim, s.N, "input", ("input", "embed"), scaling, rngs=rngs,
                           dtype=dtype)
        self.moe = MoE(s.N, s.Ne, s.M, s.K, scaling, rngs=rngs, renormalize=renormalize,
                       dispatch=dispatch, load_balance=load_balance, exact_gelu=exact_gelu,
                       dtype=dtype)
        self.w_out = Linear(s.N, output_dim, "readout", ("embed", "classes"), scaling, rngs=rngs)
        self.exact_gelu = exact_gelu

    def __call__(self, x: jax.Array) -> tuple[jax.Array, list[Routing]]:
        h = gelu(self.exact_gelu)(self.w_in(x))
        h_agg, routing = self.moe(h)
        return self.w_out(h_agg), [routing]


def rope_tables(seq: int, dim: int, base: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sign-flipped sin of the rotation angles, [T, 2, D/2] each, computed by numpy at
    trace time (constants of the program, not work of every step). Pair i of a head is
    (x[i], x[i + D/2]), rotated by angle t * base^(-2i/D)."""
    freqs = base ** (-np.arange(dim // 2, dtype=np.float64) / (dim // 2))
    angles = np.arange(seq, dtype=np.float64)[:, None] * freqs[None, :]  # [T, D/2]
    cos, sin = np.cos(angles), np.sin(angles)
    return (np.stack([cos, cos], 1).astype(np.float32),
            np.stack([-sin, sin], 1).astype(np.float32))


def rope(x: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding over the last axis of x [B, T, H, D]: with the halves
    x = (x1, x2), (x1 cos - x2 sin, x2 cos + x1 sin). The halves are an axis of size 2, and
    swapping them a reverse along it, so the rotation is one elementwise fusion (a split and a
    concatenate cost 4-6% of a small model's train step on CPU)."""
    b, t, h, d = x.shape
    cos, sin = rope_tables(t, d, base)
    pairs = x.reshape(b, t, h, 2, d // 2)
    rotated = pairs * cos[:, None] + jnp.flip(pairs, -2) * sin[:, None]
    return rotated.reshape(x.shape).astype(x.dtype)


MASKED = np.float32(-0.7 * np.finfo(np.float32).max)  # a masked score: exp underflows to 0


def causal_mask(seq: int) -> np.ndarray:
    """[T, T] bool, True where query t may attend to key s <= t; a numpy constant of the program."""
    return np.tril(np.ones((seq, seq), dtype=bool))


class Attention(nnx.Module):
    """Causal multi-head attention with QK-RMSNorm and RoPE; head_dim fixed across widths. The
    score and value matmuls take `dtype` inputs; the scores and softmax are float32. Written out
    rather than `jax.nn.dot_product_attention`: heads-major einsums over [B, H, T, D] and a numpy
    causal mask made the d128 train step ~7% faster on XLA:CPU (docs/BENCHMARKS.md)."""

    def __init__(self, width: int, head_dim: int, scaling: Scaling, *, rngs: nnx.Rngs,
                 qk_norm_gain: bool = True, dtype: str = "float32"):
        if head_dim <= 0 or width % head_dim:
            raise ConfigError(f"width (N={width}) must be divisible by head_dim ({head_dim}); "
                              f"allowed head_dim: divisors of {width}")
        self.num_heads, self.head_dim = width // head_dim, head_dim
        self.q, self.k, self.v = (Linear(width, width, "attn_qkv", ("embed", "heads"), scaling,
                                         rngs=rngs, dtype=dtype) for _ in range(3))
        self.q_norm = RMSNorm(head_dim, scaling, "head_dim", rngs=rngs, gain=qk_norm_gain)
        self.k_norm = RMSNorm(head_dim, scaling, "head_dim", rngs=rngs, gain=qk_norm_gain)
        self.out = Linear(width, width, "attn_out", ("heads", "embed"), scaling, rngs=rngs,
                          dtype=dtype)
        self.dtype = compute_dtype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)  # noqa: E731
        heads_major = lambda y: y.astype(self.dtype).transpose(0, 2, 1, 3)  # noqa: E731
        q = heads_major(rope(self.q_norm(split(self.q(x)))))
        k = heads_major(rope(self.k_norm(split(self.k(x)))))
        v = heads_major(split(self.v(x)))
        scores = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(causal_mask(t), scores * np.float32(self.head_dim ** -0.5), MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        y = jnp.einsum("bhts,bhsd->bhtd", probs, v).transpose(0, 2, 1, 3)
        return self.out(y.reshape(b, t, -1))


class DenseFFN(nnx.Module):
    """The dense FFN used in blocks without MoE: W_down phi(W_up x)."""

    def __init__(self, width: int, hidden: int, scaling: Scaling, *, rngs: nnx.Rngs,
                 exact_gelu: bool = False, dtype: str = "float32"):
        self.up = Linear(width, hidden, "mlp_up", ("embed", "mlp"), scaling, rngs=rngs,
                         dtype=dtype)
        self.down = Linear(hidden, width, "mlp_down", ("mlp", "embed"), scaling, rngs=rngs,
                           dtype=dtype)
        self.exact_gelu = exact_gelu

    def __call__(self, x: jax.Array) -> tuple[jax.Array, None]:
        return self.down(gelu(self.exact_gelu)(self.up(x))), None


class Block(nnx.Module):
    """x += Attn(norm x); x += FFN(norm x), FFN being the MoE layer or a dense FFN."""

    def __init__(self, scaling: Scaling, head_dim: int, use_moe: bool, ffn_width: int, *,
                 rngs: nnx.Rngs, renormalize: bool = False, dispatch: str | Dispatch = "auto",
                 load_balance: str = "switch", exact_gelu: bool = False, qk_norm_gain: bool = True,
                 dtype: str = "float32"):
        s = scaling.shape
        self.attn_norm = RMSNorm(s.N, scaling, "embed", rngs=rngs)
        self.attn = Attention(s.N, head_dim, scaling, rngs=rngs, qk_norm_gain=qk_norm_gain,
                              dtype=dtype)
        self.ffn_norm = RMSNorm(s.N, scaling, "embed", rngs=rngs)
        self.ffn = (MoE(s.N, s.Ne, s.M, s.K, scaling, rngs=rngs, renormalize=renormalize,
                        dispatch=dispatch, load_balance=load_balance, exact_gelu=exact_gelu,
                        dtype=dtype)
                    if use_moe else DenseFFN(s.N, ffn_width, scaling, rngs=rngs,
                                             exact_gelu=exact_gelu, dtype=dtype))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, Routing | None]:
        x = x + self.attn(self.attn_norm(x))
        y, routing = self.ffn(self.ffn_norm(x))
        return constrain(x + y), routing


class Group(nnx.Module):
    """The blocks from one MoE block to the next: ``size - 1`` dense blocks, then an MoE block
    (the unit `TransformerMoE` scans over: every group has the same structure)."""

    def __init__(self, block: Callable[..., Block], size: int, *, rngs: nnx.Rngs):
        # An nnx.Dict keyed '0', '1', ...: an nnx.List's int keys beside the str key that
        # `nnx.capture` adds to every module cannot be sorted when `nnx.scan` flattens the group.
        self.blocks = nnx.Dict({str(i): block(i == size - 1, rngs=rngs) for i in range(size)})
        self.size = size

    def __call__(self, x: jax.Array) -> tuple[jax.Array, Routing]:
        for i in range(self.size):
            x, routing = self.blocks[str(i)](x)
        return x, routing


# Activation rematerialisation of each group of blocks in the backward pass (`jax.checkpoint`
# policies): 'full' keeps only each group's input, 'dots_saveable' also the matmul outputs.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots_saveable": jax.checkpoint_policies.dots_saveable}


class TransformerMoE(nnx.Module):
    """Decoder-only Transformer-MoE with `scaling.shape.L` blocks and an untied lm_head.

    ``scan_layers``: the blocks are built as L / moe_every identical `Group`s stacked on a leading
    ``layers`` axis (`nnx.vmap`) and applied by `nnx.scan`, so tracing and compiling cost one group
    whatever the depth; the stacked axis is a batch axis (never fan-in) and replicated on meshes.
    Unrolled (the default), they are a list of blocks (``blocks/<i>``). Both compute the same
    function. ``remat`` (`REMAT_POLICIES`) recomputes each group's (or block's) activations in the
    backward pass instead of keeping them.
    """

    def __init__(self, vocab_size: int, scaling: Scaling, *, rngs: nnx.Rngs, head_dim: int = 64,
                 moe_every: int = 1, ffn_width: int = 0, renormalize: bool = False,
                 dispatch: str | Dispatch = "auto", load_balance: str = "switch",
                 exact_gelu: bool = False, qk_norm_gain: bool = True, dtype: str = "float32",
                 scan_layers: bool = False, remat: str = "none"):
        s = scaling.shape
        if moe_every < 1:
            raise ConfigError(f"moe_every must be >= 1 (1 = MoE in every block), got {moe_every}")
        if remat not in REMAT_POLICIES:
            raise ConfigError(f"remat must be one of {list(REMAT_POLICIES)}, got {remat!r}")
        if scan_layers and s.L % moe_every:
            raise ConfigError(f"scan_layers needs shape.depth ({s.L}) divisible by moe_every "
                              f"({moe_every}): it scans over identical groups of moe_every blocks")
        self.embed = labelled_param(rngs, scaling, "embedding", (vocab_size, s.N),
                                    ("vocab", "embed"))
        self.embed_mult = scaling.multiplier("embedding")
        block = functools.partial(Block, scaling, head_dim, ffn_width=ffn_width or 4 * s.N,
                                  renormalize=renormalize, dispatch=dispatch,
                                  load_balance=load_balance, exact_gelu=exact_gelu,
                                  qk_norm_gain=qk_norm_gain, dtype=dtype)
        self.scan_layers, self.remat = scan_layers, remat
        if scan_layers:
            @nnx.split_rngs(splits=s.L // moe_every)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=NNX_STACKED_LAYERS)
            def groups(rngs: nnx.Rngs) -> Group:
                return Group(block, moe_every, rngs=rngs)

            self.groups = groups(rngs)
        else:
            self.blocks = nnx.List([block((i + 1) % moe_every == 0, rngs=rngs)
                                    for i in range(s.L)])
        self.final_norm = RMSNorm(s.N, scaling, "embed", rngs=rngs)
        self.lm_head = Linear(s.N, vocab_size, "readout", ("embed", "vocab"), scaling, rngs=rngs)

    def _apply(self) -> Callable[[nnx.Module, jax.Array], tuple[jax.Array, Routing | None]]:
        """A block's or group's forward pass, rematerialised as `remat` says."""
        def apply(module: nnx.Module, x: jax.Array) -> tuple[jax.Array, Routing | None]:
            return module(x)

        if self.remat == "none":
            return apply
        return nnx.remat(apply, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, list[Routing] | Routing]:
        coord.record(self, embed=tokens)
        x = constrain(self.coord_apply("embed", self.embed[...], tokens))
        apply = self._apply()
        if self.scan_layers:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                      transform_metadata=NNX_STACKED_LAYERS)
            def stack(x: jax.Array, group: Group) -> tuple[jax.Array, Routing]:
                return apply(group, x)

            x, routings = stack(x, self.groups)  # one Routing, stacked over the groups
        else:
            routings = []
            for block in self.blocks:
                x, routing = apply(block, x)
                if routing is not None:
                    routings.append(routing)
        coord.record(self, residual=x)
        return self.lm_head(self.final_norm(x)), routings

    def coord_observables(self, p0: dict, pt: dict, r0: dict, rt: dict) -> dict[str, jax.Array]:
        """The residual stream at the top of the stack, and its change since initialisation:
        what depth scaling must keep of order one as L grows."""
        return {"residual/top": coord.rms(rt["residual"]),
                "residual/top_change": coord.rms(rt["residual"] - r0["residual"])}

    def coord_apply(self, name: str, w: jax.Array, tokens: jax.Array) -> jax.Array:
        """The embedding table `w` looked up at `tokens`."""
        table = constrain(w, ("vocab", None))  # whole rows: gathered like FSDP weights
        return self.embed_mult * jnp.take(table, tokens, axis=0)
