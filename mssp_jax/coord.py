"""Coordinate checks of any NNX model, measured from what its own layers record.

A coordinate check trains a model at several sizes for a few steps and measures, on a fixed probe
batch, how every layer's activations and updates scale with size (PARAMETERIZATIONS.md,
"Observables a coordinate check must report"). The log-log slope of an observable against the
size ratio is its exponent: ~0 where a parameterization is scale-stable.

The values come from the model's layers, not from a second copy of its forward pass:

* a layer calls `record(self, name=value, ...)` in its forward pass. Outside `capture` that does
  nothing (no operation is traced: the normal forward is unchanged); inside it sows the values
  into the `Observed` collection (inside `nnx.scan` they come back stacked over the layer axis).
  A value may be a zero-argument callable, evaluated only when recording (terms the normal forward
  never computes, e.g. every expert on every token).
* a recorded value named like one of the layer's Params is that parameter's input x, and the
  layer's `coord_apply(name, w, x)` says how the parameter maps it (linear in w and in x). For
  each such parameter W: activation |W_t x_t|, effective update |(W_t - W_0) x_t|, propagating
  update |W_0 (x_t - x_0)| (W_0, x_0: at initialisation; rms over all entries);
* a layer with observables of its own (the MoE layer's aggregation split and router statistics)
  returns them from `coord_observables(p0, pt, r0, rt)` (its Params' and records' values);
* every labelled Param's gradient rms and |W_t - W_0|_rms, and (``outputs=True``) every module
  method's output rms and change |y_t - y_0|_rms, need nothing from the layer: a third-party model
  labelled with `mssp_jax.label` gets those (the output hooks are `nnx.capture`'s method outputs,
  as microsoft/mup's coordinate check hooks every module's output).

Observables are keyed per layer by module path (``blocks/0/ffn/w_up/effective_update``; a
layer stacked by `nnx.vmap`/`nnx.scan` gets ``path[i]``) and pooled per role
(``expert_up/effective_update``: the quadratic mean over the layers of that role; the router's
statistics, `MEAN_POOLED`, by their arithmetic mean). `measure` trains one size over several
seeds in one compiled program; `check` runs every size and fits the exponents per seed.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mssp_jax.params import axes_of

Batch = Any
Observables = dict[str, jax.Array]
# Router statistics pooled over MoE layers by their mean (rms-like values by their quadratic mean).
MEAN_POOLED = ("gate_entropy", "max_gate", "load_max", "load_min")


class Observed(nnx.Intermediate):
    """What a layer records for a coordinate check (`record`)."""


class Output(nnx.Intermediate):
    """Every module method's output, captured when `capture(..., outputs=True)`."""


_RECORDING = contextvars.ContextVar("mssp_jax_coord_recording", default=False)


def record(module: nnx.Module, **values: Any) -> None:
    """Sow `values` into `Observed` while `capture` runs; otherwise do nothing (trace nothing)."""
    if not _RECORDING.get():
        return
    for name, value in values.items():
        module.sow(Observed, name, value() if callable(value) else value)


class Captured(NamedTuple):
    """One captured forward pass: records and method outputs, nested dicts keyed by module path
    (each leaf a tuple with one entry per call)."""

    observed: dict
    outputs: dict


@contextlib.contextmanager
def _recording() -> Iterator[None]:
    token = _RECORDING.set(True)
    try:
        yield
    finally:
        _RECORDING.reset(token)


def capture(fn: Callable[..., Any], model: nnx.Module, *args: Any,
            outputs: bool = False) -> tuple[Any, Captured]:
    """``fn(model, *args)`` and what the model's layers recorded while it ran. Call it inside the
    traced function (jit, grad, vmap) that uses the records: recording is decided at trace time."""
    kinds = (Observed, Output) if outputs else (Observed,)
    with _recording():
        result, *states = nnx.capture(fn, *kinds, method_outputs=Output if outputs else None)(
            model, *args)
    pure = [s.to_pure_dict() for s in states]
    return result, Captured(pure[0], pure[1] if outputs else {})


def rms(x: jax.Array, axes: tuple[int, ...] | None = None) -> jax.Array:
    """Root mean square over `axes` (default: all)."""
    return jnp.sqrt(jnp.mean(jnp.square(x), axes))


def _at(tree: dict, path: tuple) -> dict:
    for key in path:
        tree = tree.get(key, {}) if isinstance(tree, dict) else {}
    return tree if isinstance(tree, dict) else {}


def _stacked_axes(var: nnx.Variable) -> int:
    """Leading layer axes added by `nnx.vmap`/`nnx.scan`: the dims beyond those the Param's axes
    metadata names other than ``layers`` (stacking may or may not have added a ``layers`` name)."""
    axes = axes_of(var)
    if axes is None:
        return 0
    return max(var.get_value().ndim - sum(a != "layers" for a in axes), 0)


def _module_stacked_axes(module: nnx.Module) -> int:
    """The layer axes a module is stacked over: the fewest of any Param in its subtree (0 without
    Params; a module whose Params are all stacked is taken to run inside the stack)."""
    axes = [_stacked_axes(v) for _, v in nnx.iter_graph(module) if isinstance(v, nnx.Param)]
    return min(axes, default=0)


def _per_layer(fn: Callable[..., Any], n: int) -> Callable[..., Any]:
    for _ in range(n):
        fn = jax.vmap(fn)
    return fn


def _direct_params(module: nnx.Module) -> dict[str, nnx.Param]:
    return {k: v for k, v in vars(module).items() if isinstance(v, nnx.Param)}


def _kernel_terms(apply: Callable, w0: jax.Array, wt: jax.Array, x0: jax.Array,
                  xt: jax.Array) -> dict[str, jax.Array]:
    """Activation, effective and propagating update of one linear map W applied to input x."""
    terms = {"activation": rms(apply(wt, xt)), "effective_update": rms(apply(wt - w0, xt))}
    # integer inputs (token ids) are data: they never move
    if jnp.issubdtype(xt.dtype, jnp.floating):
        terms["propagating_update"] = rms(apply(w0, xt - x0))
    return terms


def _first_float(value: Any) -> jax.Array | None:
    leaves = [x for x in jax.tree.leaves(value)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
    return leaves[0] if leaves else None


class _Collector:
    """Per-layer scalars and their pools (per role, per observable name)."""

    def __init__(self, stacked: dict[tuple, int]) -> None:
        self.stacked = stacked  # module path -> its stacked layer axes (the root: none)
        self.values: Observables = {}
        self.pools: dict[str, list[jax.Array]] = defaultdict(list)

    def _key(self, path: tuple, name: str, layer: int | None) -> str:
        """``a/b/name``, or for a stacked module ``stack[layer]/b/name``, `stack` being the
        outermost stacked module on its path (the one `nnx.vmap` created)."""
        cut = next((k for k in range(1, len(path) + 1) if self.stacked.get(path[:k])), len(path))
        head = "/".join(map(str, path[:cut])) + ("" if layer is None else f"[{layer}]")
        return "/".join(part for part in (head, *map(str, path[cut:]), name) if part)

    def add(self, path: tuple, stacked: int, name: str, pooled: str, value: jax.Array) -> None:
        """`value` of observable `name` of the module at `path`: a scalar, or one per layer
        ([layers...]) when the value is `stacked`."""
        value = jnp.asarray(value)
        if stacked:
            for i, v in enumerate(value.reshape(-1)):
                self.values[self._key(path, name, i)] = v
        else:
            self.values[self._key(path, name, None)] = value
        self.pools[pooled].append(value.reshape(-1))

    def result(self) -> Observables:
        out = dict(self.values)
        for name, parts in self.pools.items():
            v = jnp.concatenate(parts)
            if v.size == 1:
                out[name] = v[0]
            elif name.rsplit("/", 1)[-1] in MEAN_POOLED:
                out[name] = jnp.mean(v)
            else:
                out[name] = rms(v)
        return out


def _calls(tree: dict) -> dict[str, tuple]:
    """The recorded values of one module (tuples, one entry per call), not its children's."""
    return {k: v for k, v in tree.items() if isinstance(v, tuple)}


def _parameter_terms(out: _Collector, path: tuple, m0: nnx.Module, mt: nnx.Module,
                     mg: nnx.Module, r0: dict, rt: dict) -> None:
    """Each Param's gradient and change, and (recorded input + `coord_apply`) its kernel terms."""
    params0, grads = _direct_params(m0), _direct_params(mg)
    for name, var in _direct_params(mt).items():
        n, role = _stacked_axes(var), var.get_metadata().get("role", name)
        w0, wt = params0[name][...], var[...]
        per_layer = tuple(range(n, wt.ndim))
        out.add(path, n, f"{name}/grad", f"{role}/grad", rms(grads[name][...], per_layer))
        out.add(path, n, f"{name}/weight_change", f"{role}/weight_change", rms(wt - w0, per_layer))
        if name in rt and hasattr(mt, "coord_apply"):
            apply = lambda w, x, name=name: mt.coord_apply(name, w, x)  # noqa: E731
            terms = _per_layer(lambda *a: _kernel_terms(apply, *a), n)(w0, wt, r0[name][0],
                                                                       rt[name][0])
            for kind, value in terms.items():
                out.add(path, n, f"{name}/{kind}", f"{role}/{kind}", value)


def _layer_terms(out: _Collector, path: tuple, m0: nnx.Module, mt: nnx.Module, r0: dict,
                 rt: dict) -> None:
    """The layer's own observables (`coord_observables`), per layer when stacked."""
    if not rt or not hasattr(mt, "coord_observables"):
        return
    values = [{k: v[...] for k, v in _direct_params(m).items()} for m in (m0, mt)]
    firsts = [{k: v[0] for k, v in r.items()} for r in (r0, rt)]
    n = out.stacked[path]
    for name, value in _per_layer(mt.coord_observables, n)(*values, *firsts).items():
        out.add(path, n, name, name, value)


def _output_terms(out: _Collector, path: tuple, module: nnx.Module, o0: dict, ot: dict) -> None:
    """Each method's output rms and change since initialisation (per layer when stacked)."""
    n = out.stacked[path]
    for method, calls in ot.items():
        y0, yt = _first_float(o0[method][0]), _first_float(calls[0])
        if method.startswith("coord_") or yt is None:  # the hooks, not the forward pass
            continue
        per_layer = tuple(range(n, yt.ndim))
        name = "output" if method == "__call__" else f"{method}/output"
        pooled = f"{type(module).__name__}{'' if method == '__call__' else '.' + method}/output"
        out.add(path, n, name, pooled, rms(yt, per_layer))
        out.add(path, n, f"{name}_change", f"{pooled}_change", rms(yt - y0, per_layer))


def observables(graphdef: nnx.GraphDef, rest: Any, p0: Any, pt: Any, grads: Any,
                cap0: Captured, capt: Captured) -> Observables:
    """Every observable (a scalar) of a model at W_t against its W_0 (traceable).

    `p0`, `pt`, `grads`: the Param states at initialisation, now, and the loss gradient now;
    `cap0`, `capt`: `capture` of the same probe forward pass at W_0 and at W_t. A module called
    more than once per forward pass is measured at its first call.
    """
    models = [nnx.merge(graphdef, p, rest) for p in (p0, pt, grads)]
    out = _Collector({path: _module_stacked_axes(m) if path else 0
                      for path, m in nnx.iter_modules(models[1])})
    for (path, m0), (_, mt), (_, mg) in zip(*(nnx.iter_modules(m) for m in models)):
        r0, rt = (_calls(_at(c.observed, path)) for c in (cap0, capt))
        _parameter_terms(out, path, m0, mt, mg, r0, rt)
        _layer_terms(out, path, m0, mt, r0, rt)
        _output_terms(out, path, mt, *(_calls(_at(c.outputs, path)) for c in (cap0, capt)))
    return out.result()


ModelAndOptimizer = tuple[nnx.Module, optax.GradientTransformation]


def measure(make: Callable[[int], ModelAndOptimizer],
            loss: Callable[[nnx.Module, Batch], jax.Array],
            batches: Batch, probe: Batch, record_steps: Sequence[int], seeds: Sequence[int],
            outputs: bool = True) -> dict[int, dict[str, np.ndarray]]:
    """Trains ``make(seed)``'s model with its optimizer on `batches` (leaves [steps, ...], one batch
    per step, online) and returns every observable per seed ([S]) at each of `record_steps`
    (0: at initialisation), measured on `probe`. All seeds and steps are one compiled program;
    the optimizers must be the same transformation for every seed (only the init differs)."""
    record = sorted(set(record_steps))
    built = [make(int(seed)) for seed in seeds]
    graphdef, _, rest = nnx.split(built[0][0], nnx.Param, ...)
    params = jax.tree.map(lambda *xs: jnp.stack(xs),
                          *(nnx.pure(nnx.state(m, nnx.Param)) for m, _ in built))
    tx = built[0][1]

    def captured_loss(p: Any, batch: Batch) -> tuple[jax.Array, Captured]:
        return capture(loss, nnx.merge(graphdef, p, rest), batch, outputs=outputs)

    def grad(p: Any, batch: Batch) -> Any:
        return jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest), batch))(p)

    def step(carry, batch):
        p, opt_state = carry
        grads = grad(p, batch)
        updates, opt_state = tx.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), None

    def one_seed(p0, batches):
        cap0 = captured_loss(p0, probe)[1]
        carry, prev, out = (p0, tx.init(p0)), 0, []
        for r in record:
            if r > prev:
                carry, _ = jax.lax.scan(step, carry, jax.tree.map(lambda a: a[prev:r], batches))
                prev = r
            # the records now come from the same program as cap0 (not one under grad): at
            # W_t = W_0 they are equal to the bit, so every change is exactly 0 at step 0
            capt = captured_loss(carry[0], probe)[1]
            grads = grad(carry[0], probe)
            out.append(observables(graphdef, rest, p0, carry[0], grads, cap0, capt))
        return out

    per_seed = jax.jit(jax.vmap(one_seed, in_axes=(0, None)))(params, batches)
    return {r: {k: np.asarray(v) for k, v in obs.items()} for r, obs in zip(record, per_seed)}


def fit_exponent(ratios: Any, values: Any) -> float:
    """Least-squares slope of log(value) vs log(ratio); NaN if any value is not positive."""
    ratios, values = np.asarray(ratios, float), np.asarray(values, float)
    if len(ratios) < 2 or not np.all(values > 0) or not np.all(np.isfinite(values)):
        return float("nan")
    return float(np.polyfit(np.log(ratios), np.log(values), 1)[0])


def exponent_stats(ratios: Sequence[float], per_seed: Any) -> dict[str, Any]:
    """Per-seed exponents of `per_seed` ([scales, seeds]) and their mean and sample std over seeds
    (NaN where any seed's fit is undefined, e.g. a value exactly 0)."""
    per_seed = np.asarray(per_seed, float)
    fits = [fit_exponent(ratios, per_seed[:, s]) for s in range(per_seed.shape[1])]
    std = float(np.std(fits, ddof=1)) if len(fits) > 1 else 0.0
    return {"exponent": float(np.mean(fits)), "exponent_std": std, "exponents": fits}


def summarize(scales: Sequence[float], seeds: Sequence[int],
              per_scale: Sequence[dict[int, dict[str, np.ndarray]]]) -> dict[str, Any]:
    """`measure`'s results at each scale as ``{'scales', 'seeds', 'steps': {step: {observable:
    {'per_seed': [scale][seed], 'values': seed means per scale, 'exponent', 'exponent_std',
    'exponents': per seed}}}}``: the exponent is the slope of log(value) against log(scale),
    fitted per seed, with its mean and sample std over seeds (not one fit to the means)."""
    steps = {}
    for step, names in per_scale[0].items():
        steps[str(step)] = {}
        for name in names:
            table = np.stack([s[step][name] for s in per_scale])  # [scales, seeds]
            steps[str(step)][name] = {"per_seed": table.tolist(), "values": table.mean(1).tolist(),
                                      **exponent_stats(scales, table)}
    return {"scales": list(scales), "seeds": [int(s) for s in seeds], "steps": steps}


def check(make: Callable[[float, int], ModelAndOptimizer],
          loss: Callable[[nnx.Module, Batch], jax.Array], scales: Sequence[float], batches: Batch,
          probe: Batch, record_steps: Sequence[int], seeds: Sequence[int],
          outputs: bool = True) -> dict[str, Any]:
    """The coordinate check of any labelled model: ``make(scale, seed)`` returns the model at that
    size (the seed drawing its init) and its optimizer; each size is trained on `batches` and
    measured on `probe` (`measure`), and the exponents are fitted per seed (`summarize`)."""
    return summarize(scales, seeds, [
        measure(lambda seed, scale=scale: make(scale, seed), loss, batches, probe, record_steps,
                seeds, outputs) for scale in scales])
