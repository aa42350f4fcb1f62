"""XLA compiler options of our jitted steps, per backend, and `jit` that applies them.

On XLA:CPU (jaxlib 0.10), dot products are by default handed to YNNPACK ("individual_dot"
library fusions). For the matmul shapes of our models (expert tiles of 8-128 rows, widths
64-512) YNNPACK ran ~25 GFLOP/s where XLA's Eigen kernels ran ~62 on the same 2 cores, and
turning it off made the reference-shaped Transformer-MoE train step 7-22% faster
(docs/BENCHMARKS.md). The flag is read from XLA_FLAGS once, when the backend starts, so we pass
it per jitted program (`jax.jit(compiler_options=...)`), which works after JAX is initialised.

A per-program option replaces the whole list of YNNPACK fusion types. jaxlib 0.10.2's default list
is {individual_dot, reduce} (read off compiled programs); YNNPACK's reductions were slow here too
(5 ms for the [2, 2048, 128] -> [2048, 128] sum of the MoE's combine, a tenth of the layer), and
the empty list was the fastest of default / reduce only / empty on whole train steps, so we pass
the empty list. A user whose XLA_FLAGS sets the flag keeps their choice: we then pass nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax

YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {YNN_FUSION_FLAG: ""}  # no YNNPACK fusions: XLA's own (Eigen) kernels
OPTIONS = {"cpu": CPU_OPTIONS}


def user_sets(flag: str, xla_flags: str | None = None) -> bool:
    """Whether XLA_FLAGS (or `xla_flags`) sets `flag` (as --flag=value or --flag value)."""
    text = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    return any(token.lstrip("-").split("=", 1)[0] == flag for token in text.split())


def options(backend: str | None = None) -> dict[str, str] | None:
    """The compiler options of our steps on `backend` (default: JAX's default backend), less
    those the user's XLA_FLAGS already sets; None when nothing is left."""
    chosen = OPTIONS.get(backend or jax.default_backend(), {})
    left = {flag: value for flag, value in chosen.items() if not user_sets(flag)}
    return left or None


def jit(fun: Callable, **kwargs: Any) -> Any:
    """`jax.jit(fun, **kwargs)` with this backend's `options()`."""
    return jax.jit(fun, compiler_options=options(), **kwargs)
