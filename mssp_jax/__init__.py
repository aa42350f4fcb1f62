"""mssp_jax: scale Mixture-of-Experts models without re-tuning (SP / muP / MSSP for JAX).

The public API, in one place. Typical use (see docs/GUIDE.md):

    scaling = mssp_jax.make_scaling("mssp", base=Shape(...), shape=Shape(...))
    labelled = mssp_jax.label(model, {"*/router/kernel": "router", ...})  # models we did not write
    tx = mssp_jax.adamw(3e-3, scaling, mssp_jax.role_labels(labelled))

Importing this package loads JAX, Flax and Optax only; the data, training and experiment
modules (TFDS, orbax) load when imported themselves. The per-parameter table is exported as
`describe_params`, since the name `describe` stays the submodule `mssp_jax.describe`.
"""

# Shapes and parameterizations.
from mssp_jax.presets import PRESETS, REGIMES, ROLES  # preset tables by name; regimes I-III; roles
from mssp_jax.scaling import ConfigError  # bad input; the message names field, allowed values
from mssp_jax.scaling import Scaling  # a parameterization resolved at one base, shape, regime
from mssp_jax.scaling import Shape  # the five size knobs N, Ne, M, K, L
from mssp_jax.scaling import make_scaling  # preset name or table + base + shape -> Scaling
from mssp_jax.presets import with_tuned  # a table with base-width tuned multipliers written in
from mssp_jax.paper import table as paper_table  # a preset in the reference code's constants

# Parameters and their roles.
from mssp_jax.params import labelled_param  # an nnx.Param initialised by its role's rule
from mssp_jax.params import logical_axes  # tree of logical axis names (for sharding)
from mssp_jax.params import role_labels  # tree of role strings: what the optimizers read

# Models we did not write.
from mssp_jax.labelling import NNX_STACKED_LAYERS  # nnx.vmap/scan transform_metadata for layers
from mssp_jax.labelling import label  # roles by path pattern and/or wrapper; checks coverage
from mssp_jax.labelling import linen_with_role  # Linen initialiser wrapper carrying a role
from mssp_jax.labelling import reinit  # fresh values from the parameterization's init rules
from mssp_jax.labelling import with_role  # NNX initialiser wrapper carrying a role

# Our models.
from mssp_jax.models import MLPMoE  # the paper's MLP-MoE
from mssp_jax.models import TransformerMoE  # decoder-only Transformer with MoE FFNs
from mssp_jax.moe import MoE  # the MoE layer: router + stacked experts
from mssp_jax.moe import Routing  # which experts each token uses, with gates and load
from mssp_jax.moe import route  # top-K sigmoid routing with tie-breaking

# Optax transformations.
from mssp_jax.optim import adamw  # Adam(W) with per-role LR and eps, decoupled decay
from mssp_jax.optim import eps_multipliers  # per-leaf Adam-eps factors
from mssp_jax.optim import lr_multipliers  # per-leaf LR factors
from mssp_jax.optim import make_optimizer  # adamw or sgd, as scaling.optimizer says
from mssp_jax.optim import scale_by_tree  # stateless per-leaf multiply
from mssp_jax.optim import sgd  # SGD (optional momentum) with per-role LR

# Coordinate checks (the module mssp_jax.coord also has record / capture for layer authors).
from mssp_jax.coord import check as coordinate_check  # any labelled model: exponents over seeds

# Inspection.
from mssp_jax.describe import describe as describe_params  # one row per parameter
from mssp_jax.describe import format_table  # those rows as a readable table

__all__ = [
    "PRESETS", "REGIMES", "ROLES", "ConfigError", "Scaling", "Shape", "make_scaling",
    "with_tuned", "paper_table",
    "labelled_param", "logical_axes", "role_labels",
    "NNX_STACKED_LAYERS", "label", "linen_with_role", "reinit", "with_role",
    "MLPMoE", "TransformerMoE", "MoE", "Routing", "route",
    "adamw", "eps_multipliers", "lr_multipliers", "make_optimizer", "scale_by_tree", "sgd",
    "coordinate_check", "describe_params", "format_table",
]
