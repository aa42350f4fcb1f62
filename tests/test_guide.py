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


@pytest.fixture(scope="module")
def guide() -> dict:
    """The namespace left by running every ```python block of the guide, in order."""
    text = (ROOT / "docs" / "GUIDE.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) >= 6, "the guide lost its examples"
    namespace: dict = {"__name__": "guide"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/GUIDE.md python block {i + 1}", "exec"), namespace)  # noqa: S102
    return namespace


def test_nnx_example_gets_mssp_inits_and_per_role_lr(guide):
    model, scaling = guide["model"], guide["scaling"]
    assert scaling.regime == "II"
    wo = np.asarray(model.wo[...])  # expert_down: fan_in^-1/2 * sqrt(M) under MSSP regime II
    np.testing.assert_allclose(wo.std(), scaling.shape.Ne ** -0.5 * scaling.shape.M ** 0.5, rtol=0.1)
    # The readout starts at zero and then moves by at most ~lr * lr_scale per Adam step.
    steps, head = len(guide["losses"]), np.abs(np.asarray(model.head.kernel[...]))
    assert 0 < head.max() <= 1.5 * steps * 1e-2 * scaling.lr_scale("readout")
    labels = guide["mssp_jax"].role_labels(guide["labelled"])
    assert labels["wo"] == "expert_down" and labels["router"]["kernel"] == "router"
    assert guide["losses"][-1] < guide["losses"][0]


def test_linen_example_records_the_layer_axis(guide):
    router = guide["linen_labelled"]["blocks"]["router"]["kernel"]
    assert router.shape[0] == guide["shape2"].L and router.fan_in == guide["shape2"].N
    params = guide["params"]
    assert jax.tree.structure(params) == jax.tree.structure(
        guide["nn"].unbox(guide["variables"]["params"]))
    assert np.isfinite(float(guide["loss"]))


def test_custom_table_and_sweep_outputs(guide):
    custom = guide["custom"]
    assert custom.lr_scale("router") == pytest.approx(guide["base"].N / guide["shape"].N)
    expected = (len(guide["widths"]), len(guide["lrs"]))
    assert guide["final_loss"].shape == guide["feature_change"].shape == expected
    assert np.isfinite(np.asarray(guide["final_loss"])).all()


def test_api_reference_builds_without_warnings(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "docs" / "build_api.sh"), str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    page = (tmp_path / "mssp_jax" / "labelling.html").read_text()
    assert "def label" in page or "label</span>" in page
