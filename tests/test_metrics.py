"""What a researcher reads: throughput and ETA without the pauses, records that a restart does not
repeat (JSONL and TensorBoard), accuracy, the loss curve's title and tick labels."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from configs import mlp_moe
from mssp_jax import factory, losses, metrics, train
from tests import tensorboard_events


def test_throughput_excludes_pauses_and_the_eta_follows(tmp_path, capsys):
    clock = iter([0.0, 1.0, 3.0, 10.0]).__next__
    rates = metrics.Throughput(items_per_step=32, unit="tokens", clock=clock)
    assert rates.rates(5) == {}  # not started: the first step includes compilation
    rates.start(1)  # t = 0
    with rates.pause():  # t = 1 .. 3: an evaluation
        pass
    record = {"loss": 2.0, **rates.rates(11)}  # t = 10: 10 steps in 10 - 2 s
    assert record == {"loss": 2.0, "steps_per_s": 1.25, "tokens_per_s": 40.0}
    writer = metrics.Writer(tmp_path, total_steps=111, enabled=True)
    writer.progress(11, record)
    writer.close()
    # 100 steps left at 1.25 steps/s: 80 s, the pauses not extrapolated
    assert capsys.readouterr().out == ("step 11/111  loss 2.0000  1.2 steps/s  40 tokens/s"
                                       "  ETA 1:20\n")


def test_a_resumed_writer_drops_the_steps_the_restart_repeats(tmp_path):
    first = metrics.Writer(tmp_path, 10, resume_from=0, enabled=True)
    for step in range(1, 7):
        first.write("train", step, {"loss": 10.0 - step})
    first.write("eval", 4, {"loss": 7.5})
    # killed after step 6, in the middle of a line; the latest checkpoint holds step 4
    first.close()
    with open(tmp_path / metrics.METRICS_FILE, "a") as jsonl:
        jsonl.write('{"kind": "train", "step": 7, "lo')
    resumed = metrics.Writer(tmp_path, 10, resume_from=4, enabled=True)
    for step in (5, 6):
        resumed.write("train", step, {"loss": 100.0 + step})
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / metrics.METRICS_FILE).read_text().splitlines()]
    assert [(r["kind"], r["step"], r["loss"]) for r in rows] == [
        ("train", 1, 9.0), ("train", 2, 8.0), ("train", 3, 7.0), ("train", 4, 6.0),
        ("eval", 4, 7.5), ("train", 5, 105.0), ("train", 6, 106.0)]
    shown = tensorboard_events.scalars(tmp_path / "tensorboard")
    assert shown["train/loss"] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 105.0), (6, 106.0)]
    assert shown["eval/loss"] == [(4, 7.5)]
    evaluation = metrics.Writer(tmp_path, 10, enabled=True)  # `run.py eval`: appends only
    evaluation.write("eval", 6, {"loss": 7.0})
    evaluation.close()
    assert len((tmp_path / metrics.METRICS_FILE).read_text().splitlines()) == len(rows) + 1


def test_accuracy_counts_the_largest_output_or_the_sign():
    multiclass = jnp.array([[0.1, 0.9, 0.0], [0.8, 0.2, 0.0], [0.3, 0.7, 0.0], [0.0, 0.0, 1.0]])
    assert losses.accuracy(multiclass, jnp.array([1, 1, 1, 2])) == np.float32(3 / 4)
    binary = jnp.array([[0.5], [-0.2], [0.1], [-3.0], [2.0]])  # targets -1 / +1
    assert losses.accuracy(binary, jnp.array([1.0, -1.0, -1.0, -1.0, -1.0])) == np.float32(3 / 5)


@pytest.mark.parametrize("first,last,scale", [(10.0, 0.05, "log"), (2.1, 1.6, "linear")])
def test_loss_curve_has_a_title_and_plain_tick_labels(tmp_path, first, last, scale):
    writer = metrics.Writer(tmp_path, 50, resume_from=0, enabled=True)
    for step, loss in enumerate(np.geomspace(first, last, 50), start=1):
        writer.write("train", step, {"loss": loss})
    writer.close()
    title = train.run_title("mlp_moe", factory.scaling_from_config(mlp_moe.get_config(
        "regime=III,scale=2")))
    assert title == "mlp_moe, mssp, regime III, scale 2 (N=128, N_e=128, M=16, K=4, L=1)"
    fig = metrics.loss_curve_figure(tmp_path, title)
    fig.canvas.draw()
    (ax,) = fig.axes
    low, high = ax.get_ylim()
    labels = [t.get_text() for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True)
              if t.get_text() and low <= t.get_position()[1] <= high]
    assert ax.get_title() == title and ax.get_yscale() == scale
    assert len(labels) >= 3 and all(float(text) > 0 for text in labels), labels  # no 10^k, no $
