"""Token-to-expert dispatch: given the routing, compute sum_k w_tk * W2_e phi(W1_e^T x_t).

Every implementation has the signature ``(x [T,N], w_up [M,N,Ne], w_down [M,Ne,N], idx [T,K],
weights [T,K], act) -> y [T,N]`` and, except `capacity` when an expert overflows, computes the same
function with the same gradients (tested). They differ in cost:

* `dense`: every expert on every token, masked by the gates; cost ~ M/K x the active FLOPs.
* `sorted`: the T*K token-slots grouped by expert (a sort), each group padded to whole tiles of
  `tile` rows (`default_tile`), one batched matmul over the tiles; cost ~ (T*K + M*tile) rows,
  i.e. the active FLOPs plus the padding. The worst-case tile count is static, so it jits.
* `ragged`: the sorted slots through `jax.lax.ragged_dot` (grouped GEMM). Efficient where the
  backend has a grouped-GEMM kernel (GPU/TPU); XLA:CPU lowers it to work on every expert.
* `capacity`: GShard/Switch buffers of ``ceil(capacity_factor * T*K / M)`` rows per expert; slots
  beyond an expert's capacity are dropped (contribute 0). Priority: all first choices (k = 0) in
  token order, then all second choices, and so on. Not exact when an expert overflows.
* `bucketed`: exact and dropless: `capacity`'s buffers with the smallest factor of
  `CAPACITY_BUCKETS` that holds the busiest expert, `sorted` when none does (`jax.lax.switch`:
  one branch runs). On CPU a [M, C] buffer costs 2-4x less than sorted tiles (no per-tile weight
  copies, M batch items instead of ~T*K/tile + M), so balanced routing runs at capacity's speed.
  Under `vmap` with per-run routing a switch would become a select that runs every branch, so
  the vmapped switch runs sorted tiles for every run instead (`jax.custom_batching.custom_vmap`).

`get("auto")` is the fastest exact one for `jax.default_backend()` (see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Dispatch = Callable[..., jax.Array]
Activation = Callable[[jax.Array], jax.Array]

DEFAULT_CAPACITY_FACTOR = 1.25  # GShard / Switch default
AUTO = {"cpu": "bucketed", "gpu": "ragged", "tpu": "ragged"}  # fastest exact dispatch per backend
# capacity factors `bucketed` tries, smallest first, and the largest buffer it uses relative to
# sorted tiles' worst-case rows. Measured on CPU (T*K = 4096, N 128, N_e 256, train step of the
# layer): a 1.5x buffer cost 0.41-0.78x sorted tiles at M = 8..64; a 2x buffer 0.52x at M = 64,
# 0.86x at M = 32, but 1.09x at M = 16 and 1.19x at M = 8, where it is 1.47 / 1.64x sorted's rows
CAPACITY_BUCKETS = (1.25, 1.5, 2.0)
MAX_BUFFER_OVER_TILES = 1.4
PACKED_SORT_LIMIT = 2**31  # (expert, slot) packed in one int32 sort key below this many keys


def dense(x: jax.Array, w_up: jax.Array, w_down: jax.Array, idx: jax.Array, weights: jax.Array,
          act: Activation) -> jax.Array:
    """Every expert on every token, masked by the gates: exact, simple, cost ~ M/K x active."""
    hidden = act(jnp.einsum("tn,mne->tme", x, w_up))
    return jnp.einsum("tme,men,tm->tn", hidden, w_down, dense_gates(idx, weights, w_up.shape[0]))


def dense_gates(idx: jax.Array, weights: jax.Array, num_experts: int) -> jax.Array:
    """The gates as a [T, M] matrix: weights[t, k] at (t, idx[t, k]), 0 for unselected experts."""
    gates = jnp.zeros((idx.shape[0], num_experts), weights.dtype)
    return gates.at[jnp.arange(idx.shape[0])[:, None], idx].add(weights)


class Slots(NamedTuple):
    """The T*K token-slots in priority order (slot s = k*T + t), grouped by expert."""

    token: jax.Array  # [S] token of each slot
    expert: jax.Array  # [S] expert of each slot
    rank: jax.Array  # [S] position of the slot inside its expert's group (priority order)
    sizes: jax.Array  # [M] group size of each expert
    order: jax.Array  # [S] slots sorted by expert (stable, so priority order inside a group)


def group_slots(idx: jax.Array, num_experts: int) -> Slots:
    """Sorts the slots by expert; k-major so that all first choices come before second ones."""
    num_tokens, k = idx.shape
    num_slots = num_tokens * k
    expert = idx.T.reshape(-1)
    if num_experts * num_slots < PACKED_SORT_LIMIT:  # one int32 key sorts ~4x faster on CPU
        keys = expert * num_slots + jnp.arange(num_slots, dtype=expert.dtype)
        order = jax.lax.sort(keys) % num_slots
    else:
        order = jnp.argsort(expert, stable=True)
    sizes = jnp.bincount(expert, length=num_experts)
    starts = jnp.cumsum(sizes) - sizes
    sorted_rank = jnp.arange(num_slots) - starts[expert[order]]
    rank = jnp.zeros_like(sorted_rank).at[order].set(sorted_rank)
    return Slots(jnp.arange(num_tokens * k) % num_tokens, expert, rank, sizes, order)


def _combine(y_slots: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_k w_tk y_(k*T+t): y_slots [S, N] in slot order -> [T, N]."""
    num_tokens, k = weights.shape
    return jnp.einsum("ktn,tk->tn", y_slots.reshape(k, num_tokens, -1), weights)


def _blocked_ffn(x: jax.Array, rows: jax.Array, valid: jax.Array, num_rows: int,
                 w_up: jax.Array, w_down: jax.Array, act: Activation,
                 slot_token: jax.Array) -> jax.Array:
    """Places slot s at buffer row rows[s] (if valid), runs block b of the buffer through expert
    weights w_up[b] / w_down[b] (blocks of equal size), and returns each slot's output [S, N]."""
    num_blocks = w_up.shape[0]
    rows = jnp.where(valid, rows, num_rows)  # invalid slots land on a discarded extra row
    row_token = jnp.full((num_rows + 1,), x.shape[0], jnp.int32).at[rows].set(slot_token)
    x_padded = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
    buffer = x_padded[row_token[:num_rows]].reshape(num_blocks, num_rows // num_blocks, -1)
    hidden = act(jnp.einsum("brn,bne->bre", buffer, w_up))
    out = jnp.einsum("bre,ben->brn", hidden, w_down).reshape(num_rows, -1)
    return jnp.where(valid[:, None], out[jnp.minimum(rows, num_rows - 1)], 0)


def num_tiles(num_slots: int, num_experts: int, tile: int) -> int:
    """Worst-case tile count: sum_e ceil(s_e / tile) with sum_e s_e = num_slots."""
    return min((num_slots + num_experts * (tile - 1)) // tile, num_slots)


def default_tile(num_slots: int, num_experts: int) -> int:
    """The power of two nearest T*K / (2M), within [8, 128]: padding then adds at most ~half the
    slots, and tiles stay large enough for efficient matmuls (measured on CPU: with T*K = 4096,
    tiles of 64-128 rows were fastest at M = 8 and of 32 at M = 64; 8-row tiles were 4-8x
    slower)."""
    return int(2 ** np.clip(np.round(np.log2(max(num_slots / (2 * num_experts), 1))), 3, 7))


def sorted_tiles(x: jax.Array, w_up: jax.Array, w_down: jax.Array, idx: jax.Array,
                 weights: jax.Array, act: Activation, tile: int | None = None) -> jax.Array:
    """Grouped matmul over fixed-size tiles: each expert's slots padded to whole tiles."""
    slots = group_slots(idx, w_up.shape[0])
    return _combine(_tiled_slots(x, w_up, w_down, slots, act, tile), weights)


def _tiled_slots(x: jax.Array, w_up: jax.Array, w_down: jax.Array, slots: Slots,
                 act: Activation, tile: int | None = None) -> jax.Array:
    """`sorted_tiles` before the combine: each slot's output [S, N]."""
    num_experts, num_slots = w_up.shape[0], slots.token.shape[0]
    tile = tile or default_tile(num_slots, num_experts)
    tiles = -(-slots.sizes // tile)  # ceil
    tile_start = jnp.cumsum(tiles) - tiles
    count = num_tiles(num_slots, num_experts, tile)
    tile_expert = jnp.minimum(
        jnp.searchsorted(jnp.cumsum(tiles), jnp.arange(count), side="right"), num_experts - 1)
    rows = tile_start[slots.expert] * tile + slots.rank
    return _blocked_ffn(x, rows, jnp.ones_like(rows, bool), count * tile, w_up[tile_expert],
                        w_down[tile_expert], act, slots.token)


def ragged(x: jax.Array, w_up: jax.Array, w_down: jax.Array, idx: jax.Array, weights: jax.Array,
           act: Activation) -> jax.Array:
    """Slots sorted by expert through `jax.lax.ragged_dot` (grouped GEMM), then unsorted."""
    slots = group_slots(idx, w_up.shape[0])
    xs = x[slots.token[slots.order]]
    hidden = act(jax.lax.ragged_dot(xs, w_up, slots.sizes))
    ys = jax.lax.ragged_dot(hidden, w_down, slots.sizes)
    y = jnp.zeros_like(ys).at[slots.order].set(ys)
    return _combine(y, weights)


def capacity_per_expert(num_slots: int, num_experts: int, capacity_factor: float) -> int:
    """GShard capacity ceil(factor * T*K / M), at least 1 and at most T*K."""
    return max(1, min(num_slots, math.ceil(capacity_factor * num_slots / num_experts)))


def capacity(x: jax.Array, w_up: jax.Array, w_down: jax.Array, idx: jax.Array,
             weights: jax.Array, act: Activation,
             capacity_factor: float = DEFAULT_CAPACITY_FACTOR) -> jax.Array:
    """GShard dispatch: a [M, C] buffer per layer; slots past an expert's capacity C dropped."""
    num_experts = w_up.shape[0]
    cap = capacity_per_expert(idx.size, num_experts, capacity_factor)
    return _combine(_buffered_slots(x, w_up, w_down, group_slots(idx, num_experts), act, cap),
                    weights)


def _buffered_slots(x: jax.Array, w_up: jax.Array, w_down: jax.Array, slots: Slots,
                    act: Activation, cap: int) -> jax.Array:
    """`capacity` before the combine: each slot's output [S, N], 0 for dropped slots."""
    rows = slots.expert * cap + slots.rank
    return _blocked_ffn(x, rows, slots.rank < cap, w_up.shape[0] * cap, w_up, w_down, act,
                        slots.token)


def bucket_capacities(num_slots: int, num_experts: int) -> list[int]:
    """The buffer sizes `bucketed` tries, increasing: those below T*K whose buffer has at most
    MAX_BUFFER_OVER_TILES x the rows of sorted tiles' worst case (larger ones cost more)."""
    tile = default_tile(num_slots, num_experts)
    tile_rows = num_tiles(num_slots, num_experts, tile) * tile
    caps = sorted({capacity_per_expert(num_slots, num_experts, f) for f in CAPACITY_BUCKETS})
    return [c for c in caps
            if c < num_slots and num_experts * c <= MAX_BUFFER_OVER_TILES * tile_rows]


def bucket_index(sizes: jax.Array, caps: Sequence[int]) -> jax.Array:
    """The branch `bucketed` runs: the first capacity holding the busiest expert, len(caps)
    (sorted tiles) when none does."""
    busiest = jnp.max(sizes)
    return sum((busiest > c).astype(jnp.int32) for c in caps) if caps else jnp.int32(0)


def bucketed(x: jax.Array, w_up: jax.Array, w_down: jax.Array, idx: jax.Array,
             weights: jax.Array, act: Activation) -> jax.Array:
    """Exact: the smallest capacity buffer that drops nothing, sorted tiles if none fits."""
    num_experts = w_up.shape[0]
    slots = group_slots(idx, num_experts)
    caps = tuple(bucket_capacities(idx.size, num_experts))
    y = _switched_slots(act, caps, bucket_index(slots.sizes, caps), x, w_up, w_down, slots)
    return _combine(y, weights)


def _bucket_branches(act: Activation, caps: tuple[int, ...]) -> list[Callable]:
    """(x, w_up, w_down, slots) -> each slot's output, one per buffer size, then sorted tiles."""
    return ([functools.partial(_buffered_slots, act=act, cap=c) for c in caps]
            + [functools.partial(_tiled_slots, act=act)])


def _switch_or_tiles(branches: Sequence[Callable], index: jax.Array, *operands: Any) -> Any:
    """`lax.switch(index, branches, *operands)`; the last branch must compute what every branch
    does. Vmapped, a switch with a batched index becomes a select that runs every branch, so the
    batched call runs the last branch (sorted tiles, exact for any routing) for every run."""

    @jax.custom_batching.custom_vmap
    def switch(index: jax.Array, operands: tuple) -> Any:
        return jax.lax.switch(index, branches, *operands)

    @switch.def_vmap
    def last_branch_for_every_run(axis_size: int, in_batched: tuple, index: jax.Array,
                                  operands: tuple) -> tuple[Any, bool]:
        del axis_size, index  # the last branch is exact whatever branch the index names
        axes = jax.tree.map(lambda batched: 0 if batched else None, in_batched[1])
        out = jax.vmap(lambda ops: branches[-1](*ops), in_axes=(axes,))(operands)
        return out, jax.tree.map(lambda _: True, out)

    return switch(index, operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _switched_slots(act: Activation, caps: tuple[int, ...], index: jax.Array, x: jax.Array,
                    w_up: jax.Array, w_down: jax.Array, slots: Slots) -> jax.Array:
    """The selected branch's slot outputs. Custom VJP: JAX's own derivative of a switch makes
    every branch output every branch's residuals (zeros where not taken), which cost more than
    sorted tiles (measured 48 vs 28 ms, M = 8); here the backward re-runs the taken branch's
    forward inside its VJP, saving only the inputs."""
    return _switch_or_tiles(_bucket_branches(act, caps), index, x, w_up, w_down, slots)


def _switched_slots_fwd(act, caps, index, x, w_up, w_down, slots):
    return _switched_slots(act, caps, index, x, w_up, w_down, slots), (index, x, w_up, w_down,
                                                                        slots)


def _switched_slots_bwd(act, caps, residuals, cotangent):
    index, x, w_up, w_down, slots = residuals

    def pullback(branch: Callable) -> Callable:
        return lambda x, w_up, w_down, slots, ct: jax.vjp(
            lambda *weights: branch(*weights, slots), x, w_up, w_down)[1](ct)

    grads = _switch_or_tiles([pullback(b) for b in _bucket_branches(act, caps)], index,
                             x, w_up, w_down, slots, cotangent)
    return (None, *grads, None)


_switched_slots.defvjp(_switched_slots_fwd, _switched_slots_bwd)


_REGISTRY: dict[str, Dispatch] = {"dense": dense, "sorted": sorted_tiles, "ragged": ragged,
                                  "capacity": capacity, "bucketed": bucketed}
_OPTIONS = {"sorted": ("tile",), "capacity": ("capacity_factor",)}


def register(name: str, fn: Dispatch) -> None:
    """Makes a dispatch implementation selectable by name (config field `dispatch`)."""
    _REGISTRY[name] = fn
    get.cache_clear()


def names() -> list[str]:
    """Every accepted name, 'auto' first."""
    return ["auto", *_REGISTRY]


@functools.cache
def get(name: str, **options: float) -> Dispatch:
    """The dispatch called `name`; 'auto' is the fastest exact one for the default backend.

    Options bind keyword arguments: `tile` (sorted), `capacity_factor` (capacity). Cached, so
    equal requests return the same object (a model's dispatch is static graph data).
    """
    if name == "auto":
        name = AUTO.get(jax.default_backend(), "sorted")
    if name not in _REGISTRY:
        raise ValueError(f"dispatch must be one of {names()}, got {name!r}")
    allowed = _OPTIONS.get(name, ())
    if set(options) - set(allowed):
        raise ValueError(f"dispatch {name!r} takes options {list(allowed)}, got {sorted(options)}")
    for option, value in options.items():
        if not value > 0:
            raise ValueError(f"{option} must be > 0, got {value!r}")
    return functools.partial(_REGISTRY[name], **options) if options else _REGISTRY[name]


def from_config(config: Any) -> Dispatch:
    """The dispatch named by `config.dispatch` (default 'auto'), with `config.capacity_factor`
    bound when it is 'capacity'."""
    name = config.get("dispatch", "auto")
    if name != "capacity":
        return get(name)
    return get(name, capacity_factor=float(config.get("capacity_factor", DEFAULT_CAPACITY_FACTOR)))
