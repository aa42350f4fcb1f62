"""Labelling third-party models: coverage errors, NNX and Linen trees, stacked axes, same numbers
as our own models, and the init rules that `reinit` samples."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mssp_jax import labelling
from mssp_jax.describe import describe
from mssp_jax.models import MLPMoE
from mssp_jax.optim import adamw, eps_multipliers, lr_multipliers
from mssp_jax.params import role_labels
from mssp_jax.scaling import ConfigError, Shape, make_scaling

BASE = Shape(N=8, Ne=4, M=2, K=1)
WIDE = Shape(N=16, Ne=4, M=4, K=2)  # regime II: M grows, N_e fixed
IN_DIM, OUT_DIM = 5, 3


class ThirdPartyMoE(nnx.Module):
    """A model written without mssp_jax in mind: its own names, layouts and initialisers."""

    def __init__(self, d_model: int, d_ff: int, n_experts: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.proj_in = nnx.Linear(IN_DIM, d_model, use_bias=False, rngs=rngs)
        self.gate = nnx.Linear(d_model, n_experts, use_bias=False, rngs=rngs)
        self.experts_wi = nnx.Param(init(rngs.params(), (n_experts, d_model, d_ff)))
        self.experts_wo = nnx.Param(init(rngs.params(), (n_experts, d_ff, d_model)))
        self.head = nnx.Linear(d_model, OUT_DIM, use_bias=False, rngs=rngs)


PATTERNS = {
    "proj_in/kernel": "input",
    "gate/kernel": "router",
    "experts_wi": "expert_up",
    "experts_wo": ("expert_down", ("expert", "in", "out")),
    "head/kernel": "readout",
}


def _third_party(shape: Shape = WIDE, abstract: bool = True) -> ThirdPartyMoE:
    """The model; abstract (shapes only, no compute) unless values are needed."""
    make = lambda: ThirdPartyMoE(shape.N, shape.Ne, shape.M, rngs=nnx.Rngs(0))  # noqa: E731
    return nnx.eval_shape(make) if abstract else make()


def _numbers(rows):
    keys = ("role", "shape", "fan_in", "init", "init_std", "multiplier", "lr_scale", "eps_scale")
    return sorted(tuple(str(r[k]) for k in keys) for r in rows)


@pytest.mark.parametrize("regime,shape", [("II", WIDE), ("I", Shape(N=16, Ne=8, M=2, K=1)),
                                          ("III", Shape(N=16, Ne=8, M=4, K=2))])
def test_third_party_moe_gets_the_numbers_of_our_own_model(regime, shape):
    scaling = make_scaling("mssp", BASE, shape, regime=regime)
    # Shapes and metadata are all `describe` reads: build both models abstractly (fast).
    ours = nnx.eval_shape(lambda: MLPMoE(IN_DIM, OUT_DIM, scaling, rngs=nnx.Rngs(0)))
    labelled = labelling.label(_third_party(shape), PATTERNS)
    assert _numbers(describe(labelled, scaling)) == _numbers(describe(ours, scaling))
    # What the optimizer reads: the same multipliers, leaf for leaf, as for our own model.
    def factors(tree):
        return sorted(zip(jax.tree.leaves(role_labels(tree)), jax.tree.leaves(
            lr_multipliers(scaling, tree)), jax.tree.leaves(eps_multipliers(scaling, tree))))

    assert factors(labelled) == factors(ours)


def test_uncovered_doubly_matched_and_unused_patterns_are_listed():
    patterns = dict(PATTERNS)
    del patterns["head/kernel"]
    patterns["*kernel"] = "input"  # also matches proj_in/kernel and gate/kernel
    patterns["experts_w*"] = "expert_up"  # also matches both expert tensors
    patterns["no/such/param"] = "bias"
    with pytest.raises(ConfigError) as err:
        labelling.label(_third_party(), patterns)
    message = str(err.value)
    assert "proj_in/kernel: 'proj_in/kernel', '*kernel'" in message
    assert "gate/kernel: 'gate/kernel', '*kernel'" in message
    assert "experts_wo: 'experts_wo', 'experts_w*'" in message
    assert "'no/such/param'" in message.split("patterns that match no parameter:")[1]
    # head/kernel is matched once (by *kernel), so nothing is uncovered here ...
    assert "uncovered" not in message
    # ... and is reported when nothing matches it.
    del patterns["*kernel"]
    with pytest.raises(ConfigError, match=r"uncovered parameters[^\n]*\n  head/kernel"):
        labelling.label(_third_party(), patterns)


def test_bad_roles_and_axes_name_the_allowed_values():
    with pytest.raises(ConfigError, match="unknown role 'gate'.*router"):
        labelling.label(_third_party(), {**PATTERNS, "gate/kernel": "gate"})
    with pytest.raises(ConfigError, match="experts_wi: size axes \\('in', 'out'\\) name 2 dims"):
        labelling.label(_third_party(), {**PATTERNS, "experts_wi": ("expert_up", ("in", "out"))})
    with pytest.raises(ConfigError, match="gate/kernel: role 'router' on a rank-3"):
        tree = {"gate": {"kernel": jnp.zeros((2, 3, 4))}}
        labelling.label(tree, {"gate/kernel": "router"})
    with pytest.raises(ConfigError, match="with_role: unknown size axes \\['fan_in'\\]"):
        labelling.with_role(nnx.initializers.zeros, "router", ("fan_in", "out"))
    with pytest.raises(ConfigError, match="w: unknown size axes \\['fan_in'\\]"):
        labelling.label({"w": jnp.zeros((2, 3))}, {"w": ("router", ("fan_in", "out"))})


class Block(nn.Module):
    """A Linen block whose parameters are labelled where they are created."""

    width: int
    experts: int

    @nn.compact
    def __call__(self, x, _):
        lecun = nn.initializers.lecun_normal()
        gates = nn.Dense(self.experts, use_bias=False,
                         kernel_init=labelling.linen_with_role(lecun, "router"), name="router")(x)
        wi = self.param("wi", labelling.linen_with_role(lecun, "expert_up"),
                        (self.experts, self.width, 2 * self.width))
        wo = self.param("wo", labelling.linen_with_role(lecun, "expert_down"),
                        (self.experts, 2 * self.width, self.width))
        h = jnp.einsum("td,edf->tef", x, wi)
        return x + jnp.einsum("tef,efd,te->td", jax.nn.gelu(h), wo, jax.nn.sigmoid(gates)), None


def test_linen_scanned_layers_get_a_layers_axis_outside_fan_in():
    scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3,
                      metadata_params={nn.PARTITION_NAME: "layers"})(width=8, experts=4)
    variables = jax.eval_shape(scanned.init, jax.random.key(0), jnp.ones((2, 8)), None)
    labelled = labelling.label(variables["params"])
    router = labelled["router"]["kernel"]
    assert router.shape == (3, 8, 4)
    assert router.size_axes == ("layers", "in", "out") and router.fan_in == 8
    assert labelled["wo"].size_axes == ("layers", "expert", "in", "out")
    assert labelled["wo"].fan_in == 16
    labels = role_labels(labelled)
    assert jax.tree.structure(labels) == jax.tree.structure(nn.unbox(variables["params"]))


def test_nnx_stacked_layers_and_pattern_axes():
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=labelling.NNX_STACKED_LAYERS)
    def stack(key):
        init = labelling.with_role(nnx.initializers.lecun_normal(), "router")
        return nnx.Linear(8, 4, use_bias=False, rngs=nnx.Rngs(key), kernel_init=init)

    router = nnx.eval_shape(lambda: stack(jax.random.split(jax.random.key(0), 3)))
    labelled = labelling.label(router)
    assert labelled["kernel"].size_axes == ("layers", "in", "out")
    assert labelled["kernel"].fan_in == 8
    with pytest.raises(ConfigError, match="kernel: role metadata 'router', 'ker\\*'"):
        labelling.label(router, {"ker*": "router"})  # wrapper and pattern: labelled twice
    # The same layout stated by a pattern, for a tree that has no wrapper metadata.
    plain = {"layers": {"router": jnp.zeros((3, 8, 4))}}
    by_pattern = labelling.label(plain, {"*/router": ("router", ("layers", "in", "out"))})
    assert by_pattern["layers"]["router"].fan_in == 8


def test_reinit_samples_the_mssp_inits():
    """Zero router (I), sqrt(M) expert_down (II), one shared expert init (III), multi-dim fan-in."""
    def labelled_tree(shape):
        tree = {"router": jnp.ones((shape.N, shape.M)),
                "wo": jnp.ones((shape.M, 256, shape.N)),
                "attn_out": jnp.ones((4, 64, shape.N))}  # (heads, head_dim, embed): fan-in 256
        return labelling.label(tree, {"router": "router", "wo": "expert_down",
                                      "attn_out": ("attn_out", ("in", "in", "out"))})

    shape_i = Shape(N=64, Ne=4, M=2, K=1)
    fresh = labelling.reinit(labelled_tree(shape_i), make_scaling("mssp", BASE, shape_i),
                             jax.random.key(1))
    assert not np.any(fresh["router"])
    np.testing.assert_allclose(np.std(fresh["attn_out"]), 256 ** -0.5, rtol=0.05)

    shape_ii = Shape(N=64, Ne=4, M=16, K=8)
    fresh = labelling.reinit(labelled_tree(shape_ii), make_scaling("mssp", BASE, shape_ii),
                             jax.random.key(2))
    np.testing.assert_allclose(np.std(fresh["wo"]), 16 ** 0.5 * 256 ** -0.5, rtol=0.05)
    assert np.std(fresh["wo"][0] - fresh["wo"][1]) > 0.1  # independent experts

    shape_iii = Shape(N=64, Ne=8, M=16, K=8)
    fresh = labelling.reinit(labelled_tree(shape_iii), make_scaling("mssp", BASE, shape_iii),
                             jax.random.key(3))
    np.testing.assert_array_equal(fresh["wo"][0], fresh["wo"][15])
    np.testing.assert_allclose(np.std(fresh["wo"]), 256 ** -0.5, rtol=0.1)


def test_optimizer_steps_follow_the_labels():
    """One Adam step moves each leaf by ~ lr * lr_scale(role) (Adam's first step is sign-like)."""
    scaling = make_scaling("mssp", BASE, WIDE)
    model = _third_party(abstract=False)
    labelled = labelling.label(model, PATTERNS)
    labels = role_labels(labelled)
    optimizer = nnx.Optimizer(model, adamw(1e-2, scaling, labels), wrt=nnx.Param)
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    nnx.jit(lambda m, o, g: o.update(m, g))(model, optimizer, grads)
    moved = jax.tree.map(lambda a, b: a - b, nnx.to_pure_dict(nnx.state(model, nnx.Param)), before)
    expected = jax.tree.map(lambda r: 1e-2 * scaling.lr_scale(r), nnx.to_pure_dict(labels))
    jax.tree.map(lambda m, e: np.testing.assert_allclose(np.max(np.abs(m)), e, rtol=1e-3),
                 moved, expected)
    assert len({round(x, 8) for x in jax.tree.leaves(expected)}) > 1  # the roles differ
