"""The paper form equals the authors' reference code, number for number, on every dumped case.

../shared/reference/ holds, per reference configuration and width, every parameter of the
reference model (PyTorch, github vankadara-lab/mssp-moe @ e6b6caf). For each case we build our
model from the paper-form table of that configuration (`mssp_jax.paper`) at the same shape and
compare, per parameter (per layer, not per role): shape, zero / ones / shared-expert init, init
std, LR factor and absolute effective LR (for the reference script's base LR, tuned multipliers
included), Adam eps factor, forward multiplier, and the case's gate factor. Only the MLP's 12 NTP
cases are left out (NTP is not implemented here).
"""

from __future__ import annotations

import json
import math
import pathlib
import re

import numpy as np
import pytest
from flax import nnx

from mssp_jax import describe as describe_lib
from mssp_jax import paper
from mssp_jax.models import MLPMoE, TransformerMoE
from mssp_jax.scaling import Shape, make_scaling

REFERENCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"
REGIME = {"fixed_E": "I", "bottleneck": "II", "allscaling": "III"}
MLP_PATHS = {"w_in": ["w_in/kernel"], "w_router": ["moe/router"], "w_expert1": ["moe/w_up"],
             "w_expert2": ["moe/w_down"], "w_out": ["w_out/kernel"]}
TRANSFORMER_PATHS = [  # reference name pattern -> our paths ({i}: the block index)
    (r"transformer\.wte\.weight", ["embed"]),
    (r"transformer\.h\.(\d+)\.ln_1\.weight", ["blocks/{i}/attn_norm/scale"]),
    (r"transformer\.h\.(\d+)\.attn\.c_attn\.weight",
     ["blocks/{i}/attn/q/kernel", "blocks/{i}/attn/k/kernel", "blocks/{i}/attn/v/kernel"]),
    (r"transformer\.h\.(\d+)\.attn\.c_proj\.weight", ["blocks/{i}/attn/out/kernel"]),
    (r"transformer\.h\.(\d+)\.ln_2\.weight", ["blocks/{i}/ffn_norm/scale"]),
    (r"transformer\.h\.(\d+)\.expert_module\.(router\.)?w_g\.weight", ["blocks/{i}/ffn/router"]),
    (r"transformer\.h\.(\d+)\.expert_module\.experts\.c_fc", ["blocks/{i}/ffn/w_up"]),
    (r"transformer\.h\.(\d+)\.expert_module\.experts\.c_proj", ["blocks/{i}/ffn/w_down"]),
    (r"transformer\.h\.(\d+)\.mlp\.c_fc\.weight", ["blocks/{i}/ffn/up/kernel"]),
    (r"transformer\.h\.(\d+)\.mlp\.c_proj\.weight", ["blocks/{i}/ffn/down/kernel"]),
    (r"transformer\.ln_f\.weight", ["final_norm/scale"]),
    (r"lm_head\.weight", ["lm_head/kernel"]),
]


def load(name: str) -> dict:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference dump {path} not present")
    return json.loads(path.read_text())


class Tally:
    """Counts what was compared, so the test can say (and assert) how much it covered."""

    def __init__(self):
        self.cases, self.params, self.fields = 0, 0, 0

    def equal(self, ours: float, ref: float, where: str, rel: float = 1e-12) -> None:
        assert ours == pytest.approx(ref, rel=rel, abs=0.0), where
        self.fields += 1

    def same(self, ours, ref, where: str) -> None:
        assert ours == ref, where
        self.fields += 1


def init_kind(p: dict) -> str:
    if p["zero_init"]:
        return "zero"
    if p["ones_init"]:
        return "one"
    return "shared_normal" if p.get("experts_identical") else "normal"


def our_shape(ref_name: str, shape: list[int], parts: int, role: str) -> list[int]:
    """Torch Linear weights are [out, in] (ours [in, out]); the fused QKV is three of ours."""
    if len(shape) != 2 or role == "embedding":
        return shape
    return [shape[1], shape[0] // parts]


# ---- MLP-MoE ------------------------------------------------------------------------------

def mlp_tuned_row(dumped: dict | None, routing: str, shared: bool) -> dict | None:
    """The reference's get_optimal_values lookup, on the dump's copy of tuned_multipliers."""
    if not dumped:
        return None
    if not shared and f"{routing}_no_shared" in dumped:
        return dumped[f"{routing}_no_shared"]
    return dumped.get(routing)


def mlp_scaling(case: dict, table: dict):
    regime = REGIME[case["regime"]]
    # N_BASE, N_EXPERT_BASE(_BOTTLENECK), M_BASE
    base = Shape(128, 16 if regime == "II" else 128, 8, 8)
    shape = Shape(case["N"], case["N_expert"], case["M"], case["M"])
    return make_scaling(table, base, shape, regime=regime,
                        optimizer=paper.MLP_REFERENCE[case["config"]].optimizer,
                        input_dim=case["input_dim"])


def test_mlp_paper_form_equals_reference_on_every_case():
    tally, skipped = Tally(), 0
    for case in load("reference_mlp.json")["cases"]:
        if "ntp" in case["config"]:
            skipped += 1
            continue
        ref = paper.MLP_REFERENCE[case["config"]]
        shared = case["share_expert_weights_in"]
        table = paper.reference_table(ref, "mlp_moe", shared=shared)
        scaling = mlp_scaling(case, table)
        model = nnx.eval_shape(lambda: MLPMoE(case["input_dim"], case["n_out"], scaling,
                                              rngs=nnx.Rngs(0)))
        ours = {r["path"]: r for r in describe_lib.describe(model, scaling)}
        assert sorted(ours) == sorted(p for ps in MLP_PATHS.values() for p in ps)
        where = f"{case['config']} N={case['N']} shared={shared}"
        tally.equal(scaling.gate_scale, case["router_weight_mult_sigmoid"], f"{where} gate")
        tunings = []
        for routing in paper.ROUTINGS:
            row = paper.mlp_tuned(case["config"], routing, shared)
            dumped = mlp_tuned_row(case["tuned_multipliers"], routing, shared)
            assert (row is None) == (dumped is None), f"{where} {routing}"
            if row is not None:
                tuned = mlp_scaling(case, paper.with_tuned(table, paper.mlp_tuned_factors(row)))
                tunings.append((row, dumped, tuned))
        for p in case["params"]:
            (path,) = MLP_PATHS[p["name"]]
            mine, at = ours[path], f"{where} {p['name']}"
            tally.same(mine["shape"], p["shape"], f"{at} shape")
            tally.same(mine["init"], init_kind(p), f"{at} init")
            tally.equal(mine["init_std"], 0.0 if p["zero_init"] else p["init_std_formula"],
                        f"{at} std")
            tally.equal(mine["lr_scale"], p["lr_scale"], f"{at} lr")
            tally.equal(mine["eps_scale"], p["adam_eps_scale"], f"{at} eps")
            tally.equal(mine["multiplier"], p["forward_mult"], f"{at} forward mult")
            key = {"w_in": "lr_mult_in", "w_router": "lr_mult_router", "w_out": "lr_mult_out",
                   "w_expert1": "lr_mult_expert1", "w_expert2": "lr_mult_expert2"}[p["name"]]
            for row, dumped, tuned in tunings:  # absolute LR at the script's base LR, and std
                tally.equal(row.base_lr * tuned.lr_scale(mine["role"]),
                            dumped["base_lr"] * p["lr_scale"] * dumped[key], f"{at} effective lr")
                if not p["zero_init"]:
                    tally.equal(tuned.init_std(mine["role"], mine["fan_in"]),
                                p["init_std_formula"] * dumped["init_std_mult"], f"{at} tuned std")
            tally.params += 1
        tally.cases += 1
    assert (tally.cases, skipped) == (84, 12)
    assert tally.params == 84 * 5
    print(f"MLP: {tally.cases} cases, {tally.params} parameters, {tally.fields} fields equal")


# ---- Transformer-MoE ----------------------------------------------------------------------

def transformer_groups() -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for case in load("reference_transformer.json")["cases"]:
        groups.setdefault((case["case"], case["scaling_class"], case["family"]), []).append(case)
    return groups


def transformer_shape(case: dict) -> Shape:
    g = case["gpt_config"]
    return Shape(g["n_embd"], case["expert_hidden_dim"], g["n_exp"], g["top_k"], g["n_layer"])


def our_paths(name: str) -> list[str]:
    for pattern, paths in TRANSFORMER_PATHS:
        m = re.fullmatch(pattern, name)
        if m:
            return [p.format(i=m.group(1)) if m.groups() else p for p in paths]
    raise AssertionError(f"unmapped reference parameter {name}")


def test_transformer_paper_form_equals_reference_on_every_case():
    tally = Tally()
    for (kind, cls, family), cases in transformer_groups().items():
        cases = sorted(cases, key=lambda c: c["gpt_config"]["n_embd"])
        ref = paper.TRANSFORMER_REFERENCE[cls]
        g0 = cases[0]["gpt_config"]
        table = paper.reference_table(ref, "transformer_moe", shared=g0["tied_expert_init"])
        if kind == "native":
            native = paper.TRANSFORMER_NATIVE[family]
            assert native.scaling == cls and native.tied == g0["tied_expert_init"]
            table = paper.with_tuned(table, paper.transformer_tuned_factors(native))
        for case in cases:
            g, where = case["gpt_config"], f"{kind} {cls} {family} d={case['gpt_config']['n_embd']}"
            assert case["tuned_multipliers_applied"] == (kind == "native")
            if kind == "native":  # the family's data as transcribed in mssp_jax.paper
                n = g["n_embd"]
                tally.equal(native.learning_rate, case["train_hparams"]["learning_rate"], where)
                tally.same(native.widths[n], (g["n_exp"], g["top_k"], case["expert_hidden_dim"]),
                           where)
                tally.same((native.n_layer, native.stride, native.soft, native.micro_batch[n]),
                           (g["n_layer"], g["stride"], g["top_k"] == g["n_exp"],
                            case["train_hparams"]["batch_size"]), where)
            scaling = make_scaling(table, transformer_shape(cases[0]), transformer_shape(case),
                                   regime=ref.regime, optimizer="adam")
            model = nnx.eval_shape(lambda s=scaling, g=g: TransformerMoE(
                g["vocab_size"], s, rngs=nnx.Rngs(0), head_dim=g["n_embd"] // g["n_head"],
                moe_every=g["stride"] if g["n_exp"] > 1 else g["n_layer"] + 1,  # 1 expert: dense
                qk_norm_gain=False))
            ours = {r["path"]: r for r in describe_lib.describe(model, scaling)}
            tally.equal(scaling.gate_scale, case["router_weight_mult"], f"{where} gate")
            tally.equal(1 / math.sqrt(ours["blocks/0/attn/q/kernel"]["shape"][1] // g["n_head"]),
                        case["attn_logit_scale"], f"{where} attention scale")
            covered = set()
            for p in case["params"]:
                paths, at = our_paths(p["name"]), f"{where} {p['name']}"
                covered.update(paths)
                for path in paths:
                    mine = ours[path]
                    tally.same(mine["shape"],
                               our_shape(p["name"], p["shape"], len(paths), mine["role"]),
                               f"{at} shape")
                    tally.same(mine["init"], init_kind(p), f"{at} init")
                    tally.equal(mine["lr_scale"], p["lr_scale"], f"{at} lr")
                    tally.equal(case["train_hparams"]["learning_rate"] * mine["lr_scale"],
                                case["train_hparams"]["learning_rate"] * p["lr_scale"],
                                f"{at} effective lr")
                    tally.equal(mine["eps_scale"], p["adam_eps_scale"], f"{at} eps")
                    tally.equal(mine["multiplier"], p["forward_mult"], f"{at} forward mult")
                    # decay is applied after the LR factor: lr * wd is the same for every group,
                    # as the reference's wd / lr_scale groups
                    tally.equal(p["weight_decay_scale"] * p["lr_scale"], 1.0, f"{at} decay")
                    if p["init_std"] > 0 and not p["ones_init"]:
                        numel = math.prod(p["shape"][1:] if p.get("experts_identical")
                                          else p["shape"])
                        tally.equal(mine["init_std"], p["init_std"], f"{at} std",
                                    rel=5 / math.sqrt(2 * numel))
                    tally.params += 1
            assert covered == set(ours), f"{where}: ours only {sorted(set(ours) - covered)}"
            tally.cases += 1
    assert tally.cases == 36
    print(f"Transformer: {tally.cases} cases, {tally.params} parameters, "
          f"{tally.fields} fields equal")


def test_mlp_sampled_init_matches_reference_measured_std():
    """Our sampled init against the std the reference measured on its own tensors (N = 128):
    both are noisy, so the bound is 5 sigma of the two sampling errors combined."""
    checked = 0
    for case in load("reference_mlp.json")["cases"]:
        if "ntp" in case["config"] or case["N"] != 128:
            continue
        shared = case["share_expert_weights_in"]
        table = paper.reference_table(paper.MLP_REFERENCE[case["config"]], "mlp_moe", shared=shared)
        model = MLPMoE(case["input_dim"], case["n_out"], mlp_scaling(case, table), rngs=nnx.Rngs(1))
        state = nnx.state(model, nnx.Param)
        for p in case["params"]:
            (path,) = MLP_PATHS[p["name"]]
            node = state
            for key in path.split("/"):
                node = node[key]
            value = np.asarray(node[...])
            if p["zero_init"]:
                assert not value.any(), f"{case['config']} {p['name']}"
                continue
            numel = math.prod(p["shape"][1:] if p.get("experts_identical") else p["shape"])
            if p.get("experts_identical"):
                assert (value == value[:1]).all(), f"{case['config']} {p['name']} shared"
            noise = math.sqrt(2 / (2 * numel))
            assert value.std() == pytest.approx(p["init_std"], rel=5 * noise), \
                f"{case['config']} shared={shared} {p['name']}"
            checked += 1
    zero_readouts = 2 * sum("mup" in name for name in paper.MLP_REFERENCE)  # x shared on / off
    assert checked == 28 * 5 - zero_readouts
