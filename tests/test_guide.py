"""docs/GUIDE.md cannot rot: its python blocks run in order in one namespace, and what they
claim about the labelled third-party models is checked. The API reference builds, too."""

import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_guide() -> dict:
    """The namespace left by running every ```python block of the guide, in order."""
    text = (ROOT / "docs" / "GUIDE.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) >= 6, "the guide lost its examples"
    namespace: dict = {"__name__": "guide"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/GUIDE.md python block {i + 1}", "exec"), namespace)  # noqa: S102
    return namespace


def test_guide_runs_and_its_claims_hold():
    """One test, so that the guide runs once even when pytest-xdist splits the file."""
    guide = run_guide()
    # (a) NNX: MSSP regime II inits, labels, and training that lowers the loss.
    model, scaling = guide["model"], guide["scaling"]
    assert scaling.regime == "II"
    wo = np.asarray(model.wo[...])  # expert_down: fan_in^-1/2 * sqrt(M) under MSSP regime II
    expected_std = scaling.shape.Ne ** -0.5 * scaling.shape.M ** 0.5
    np.testing.assert_allclose(wo.std(), expected_std, rtol=0.1)
    # The readout starts at zero and then moves by at most ~lr * lr_scale per Adam step.
    steps, head = len(guide["losses"]), np.abs(np.asarray(model.head.kernel[...]))
    assert 0 < head.max() <= 1.5 * steps * 1e-2 * scaling.lr_scale("readout")
    labels = guide["mssp_jax"].role_labels(guide["labelled"])
    assert labels["wo"] == "expert_down" and labels["router"]["kernel"] == "router"
    assert guide["losses"][-1] < guide["losses"][0]
    # (b) Linen: the scanned layer axis is a batch axis; reinit gives the plain param dict.
    router = guide["linen_labelled"]["blocks"]["router"]["kernel"]
    assert router.shape[0] == guide["shape2"].L and router.fan_in == guide["shape2"].N
    assert jax.tree.structure(guide["params"]) == jax.tree.structure(
        guide["nn"].unbox(guide["variables"]["params"]))
    assert np.isfinite(float(guide["loss"]))
    # (c) the custom table's router LR rule rN^-1
    assert guide["custom"].lr_scale("router") == pytest.approx(guide["base"].N / guide["shape"].N)
    # (e) the coordinate check of the third-party model: every role, nothing moved at step 0,
    # exponents after training; and one LR-transfer result per (width, LR).
    check = guide["check"]
    assert check["scales"] == [16, 64] and check["seeds"] == [0, 1]
    at_init, after = check["steps"]["0"], check["steps"]["10"]
    for role in guide["ROLES"].values():
        assert np.all(np.asarray(at_init[f"{role}/weight_change"]["per_seed"]) == 0), role
        assert np.all(np.asarray(after[f"{role}/grad"]["per_seed"]) > 0), role
    assert at_init["TinyMoE.features/output_change"]["values"] == [0.0, 0.0]
    assert after["features/output_change"] == after["TinyMoE.features/output_change"]
    for name in ("TinyMoE.features/output_change", "head/output_change", "router/output_change"):
        assert np.isfinite(after[name]["exponent"]) and after[name]["exponent_std"] >= 0
    assert guide["final_loss"].shape == (len(guide["widths"]), len(guide["lrs"]))
    assert np.isfinite(np.asarray(guide["final_loss"])).all()


def test_api_reference_builds_without_warnings(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "docs" / "build_api.sh"), str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    page = (tmp_path / "mssp_jax" / "labelling.html").read_text()
    assert "def label" in page or "label</span>" in page
