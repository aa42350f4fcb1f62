"""Experiments: vmapped LR training, the resumable quick sweep, the quick coordinate check."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import (sweeps_coord_check, sweeps_coord_check_transformer, sweeps_depth,
                     sweeps_mlp_moe, sweeps_transformer_moe, sweeps_transformer_x8)
from experiments import coord_check, summary, sweep, tasks
from mssp_jax import coord, vmap_train
from mssp_jax.scaling import ConfigError

REPO = Path(__file__).resolve().parents[1]


def quick(module, regime: str = "II"):
    config = module.get_config(f"regime={regime}")
    config.quick = True
    return sweep.prepare(config)


def test_vmapped_lrs_equal_sequential_runs():
    config = sweep.cell_config(quick(sweeps_mlp_moe), sweep.Cell("lr", "II", "adam", "mup", 2))
    data = tasks.load(config)
    both = vmap_train.train_lrs(config, [3e-3, 3e-2], [0, 1], data)
    for i, lr in enumerate([3e-3, 3e-2]):
        one = vmap_train.train_lrs(config, [lr], [0, 1], data)
        np.testing.assert_allclose(both.train_loss[i], one.train_loss[0], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(both.eval_loss[i], one.eval_loss[0], rtol=2e-5, atol=1e-6)
    assert not np.allclose(both.eval_loss[0], both.eval_loss[1])  # the LR matters
    assert both.train_loss.shape == (2, 2, config.steps)


def _cells(workdir):
    return sorted(os.listdir(os.path.join(workdir, "cells")))


ONE_PARAMETERIZATION = ("mssp",)  # of the quick sweep's two: the second adds time, not coverage


def _sweep_until_sigterm(workdir, stop_at: str) -> tuple[int, str, str]:
    """Runs the README's quick sweep as a process and sends it SIGTERM once cell `stop_at` has
    started; returns (exit status, stdout, stderr)."""
    cmd = [sys.executable, "run.py", "sweep", "--config", "configs/sweeps_mlp_moe.py:regime=II",
           "--config.quick=True", f"--workdir={workdir}",
           f"--config.quick_overrides.sweep.parameterizations={ONE_PARAMETERIZATION}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.strip() == f"[sweep] {stop_at}":
            proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=600), "".join(out), proc.stderr.read()


@pytest.mark.filterwarnings("error::RuntimeWarning", "error::UserWarning")  # numpy, matplotlib
def test_quick_sweep_stopped_by_sigterm_resumes_records_divergence_and_plots(tmp_path, capsys):
    config = sweeps_mlp_moe.get_config("regime=II")
    config.quick = True
    config.quick_overrides.sweep.parameterizations = ONE_PARAMETERIZATION
    workdir = str(tmp_path)
    cells = sweep.plan(sweep.prepare(config))
    plan = [c.key for c in cells]
    assert plan == ["mult-II-adam-mssp-x1", "lr-II-adam-mssp-x1", "lr-II-adam-mssp-x2"]
    status, out, err = _sweep_until_sigterm(workdir, stop_at=plan[1])
    assert status == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in out and "Traceback" not in err and "Warning" not in err
    assert _cells(workdir) == sorted(f"{key}.json" for key in plan[:2])  # the cell in progress too
    written = [os.stat(sweep.cell_path(workdir, c)).st_mtime_ns for c in cells[:2]]
    # a writer killed mid-write (SIGKILL) leaves only a .tmp file: that cell must run again
    with open(os.path.join(workdir, "cells", f"{plan[2]}.json.tmp"), "w") as f:
        f.write('{"trunc')
    second = sweep.run_sweep(config, workdir)
    assert second == {"ran": plan[2:], "skipped": plan[:2], "stopped_by": None}
    assert [os.stat(sweep.cell_path(workdir, c)).st_mtime_ns for c in cells[:2]] == written
    capsys.readouterr()
    assert sweep.main(config, workdir) == 0  # everything finished: only summarises and plots
    printed = capsys.readouterr().out
    assert "| n seeds |" in printed and "| 1 | 0.01*, 0.01* |" in printed
    assert "*: the optimum is at the edge of the LR grid" in printed
    assert f"summary: {os.path.join(workdir, 'summary_II.json')}" in printed
    assert os.path.join(workdir, "figures", "loss_vs_lr_II.png") in printed

    record = sweep.load_cell(workdir, sweep.Cell("lr", "II", "adam", "mssp", 2))
    by_lr = {r["lr"]: r for r in record["runs"]}
    assert by_lr[1e30]["diverged"] and by_lr[1e30]["eval_loss"] is None
    assert not by_lr[1e-2]["diverged"] and np.isfinite(by_lr[1e-2]["eval_loss"])
    assert record["wall_s"] > 0  # what the cell cost, for the campaign's wall-time figures
    with open(os.path.join(workdir, "summary_II.json")) as f:
        summary = json.load(f)
    fam = summary["adam"]["mssp"]
    assert fam["opt_lr"] == [1e-2, 1e-2] and fam["diverged"][0] == [0, 1]
    assert fam["best_loss"][1] == pytest.approx(by_lr[1e-2]["eval_loss"])
    for name in ("loss_vs_lr_II", "loss_vs_scale_II", "early_II"):
        assert os.path.getsize(os.path.join(workdir, "figures", f"{name}.png")) > 10_000


def test_quick_coord_check_writes_exponents_and_figures(tmp_path):
    config = sweeps_coord_check.get_config("regime=III")
    config.quick = True
    assert coord_check.main(config, str(tmp_path)) == 0
    with open(tmp_path / "coord_check_III.json") as f:
        out = json.load(f)["results"]
    assert set(out) == {"mssp"} and out["mssp"]["seeds"] == [0, 1]
    step0, step2 = out["mssp"]["steps"]["0"], out["mssp"]["steps"]["2"]
    for name in ("h_agg/effective", "h_agg/propagating", "expert_down/propagating_update"):
        assert step0[name]["per_seed"] == [[0.0, 0.0], [0.0, 0.0]], name  # nothing has moved
    assert np.isnan(step0["h_agg/effective"]["exponent"])
    effective = np.asarray(step2["h_agg/effective"]["per_seed"])
    assert (effective > 0).all()
    fits = [coord.fit_exponent([1, 2], effective[:, s]) for s in (0, 1)]
    assert step2["h_agg/effective"]["exponents"] == pytest.approx(fits)
    assert step2["h_agg/effective"]["exponent"] == pytest.approx(np.mean(fits))
    for name in ("coord_exponents_III", "coord_exponents_vs_step_III", "coord_rcc_III_aggregation",
                 "coord_rcc_III_effective_update"):
        assert os.path.getsize(tmp_path / "figures" / f"{name}.png") > 10_000
    # a re-run reads the finished cells instead of training again
    cells = sorted(os.listdir(tmp_path / "cells"))
    assert cells == ["coord-III-adam-mssp-x1.json", "coord-III-adam-mssp-x2.json"]
    before = os.path.getmtime(tmp_path / "cells" / cells[0])
    assert coord_check.main(config, str(tmp_path)) == 0
    assert os.path.getmtime(tmp_path / "cells" / cells[0]) == before


@pytest.mark.parametrize("field, value", [("scales", (1,)), ("record_steps", (0, -1)),
                                          ("parameterizations", ("mssp", "nope"))])
def test_coord_check_rejects_bad_input_before_compute(tmp_path, field, value):
    config = sweeps_coord_check.get_config("regime=III")
    config.coord[field] = value
    with pytest.raises(ConfigError, match="coord.scales|coord.record_steps|parameterization"):
        coord_check.main(config, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_quick_transformer_coord_check_measures_every_block(tmp_path):
    config = sweeps_coord_check_transformer.get_config("regime=II")
    config.quick = True
    assert coord_check.main(config, str(tmp_path)) == 0
    with open(tmp_path / "coord_check_transformer_II.json") as f:
        out = json.load(f)["results"]["mssp"]
    for name in ("h_agg/propagating", "attn_out/propagating_update", "Block/output_change",
                 "residual/top_change"):
        assert np.all(np.asarray(out["steps"]["0"][name]["per_seed"]) == 0), name
    step = out["steps"]["2"]
    for block in (0, 1):  # the MoE layer of each block: its split and router, per layer
        for name in ("h_agg/base", "h_agg/effective", "router/logit_rms", "w_up/effective_update"):
            assert f"blocks/{block}/ffn/{name}" in step
    for role in ("embedding", "attn_qkv", "attn_out", "norm", "router", "expert_down", "readout"):
        assert all(v > 0 for v in step[f"{role}/effective_update"]["values"]), role
    assert "embedding/propagating_update" not in step  # its input is the data
    layers = [step[f"blocks/{b}/ffn/h_agg/base"]["per_seed"][0][1] for b in (0, 1)]
    pooled = step["h_agg/base"]["per_seed"][0][1]  # scale x1, seed 1: quadratic mean of layers
    assert pooled == pytest.approx(np.sqrt(np.mean(np.square(layers))), rel=1e-6)
    top, last_block = (np.asarray(step[k]["per_seed"]) for k in ("residual/top", "blocks/1/output"))
    np.testing.assert_allclose(top, last_block, rtol=1e-6)  # the stream leaves the last block
    assert os.path.getsize(
        tmp_path / "figures" / "coord_rcc_transformer_II_aggregation.png") > 10_000


def test_lm_task_windows_are_next_byte_pairs_each_used_once():
    config = quick(sweeps_transformer_moe, "III")
    data = tasks.load(config)
    train, evalset = data["train"], data["eval"]
    assert train["inputs"].shape == (config.steps * config.batch_size, config.seq_len)
    assert evalset["inputs"].shape == (config.eval_size, config.seq_len)
    np.testing.assert_array_equal(train["inputs"][:, 1:], train["targets"][:, :-1])
    assert len({row.tobytes() for row in train["inputs"]}) == len(train["inputs"])
    assert train["inputs"].max() < config.vocab_size


@pytest.mark.filterwarnings("error::RuntimeWarning", "error::UserWarning")  # one scale, one seed
def test_quick_transformer_sweep_trains_the_language_model(tmp_path):
    config = sweeps_transformer_moe.get_config("regime=III")
    config.quick = True
    assert sweep.main(config, str(tmp_path)) == 0
    record = sweep.load_cell(str(tmp_path), sweep.Cell("lr", "III", "adam", "mssp", 2))
    assert record["shape"]["width"] == 32 and record["shape"]["num_experts"] == 8
    by_lr = {r["lr"]: r for r in record["runs"]}
    assert by_lr[1e30]["diverged"]
    # zero-init readout (muP family): the byte-level cross-entropy starts at log(256), plus
    # aux_loss_weight (0.01) x the Switch loss (~1 for a near-uniform router)
    assert np.log(256) < by_lr[1e-2]["early"][0] < np.log(256) + 0.05
    assert np.isfinite(by_lr[1e-2]["eval_loss"])
    with open(tmp_path / "summary_III.json") as f:
        assert json.load(f)["adam"]["mssp"]["opt_lr"] == [1e-2]


def test_finished_merges_the_seeds_of_other_workdirs(tmp_path):
    config = quick(sweeps_mlp_moe)
    config.sweep.merge_workdirs = (str(tmp_path / "seed1"),)
    cells = [c for c in sweep.plan(config) if c.kind == "lr"]
    for seed, workdir in ((0, tmp_path), (1, tmp_path / "seed1")):
        for cell in cells:
            runs = [{"lr": lr, "seed": seed, "eval_loss": 1.0 + lr + seed, "diverged": False}
                    for lr in (0.1, 0.2)]
            sweep.write_atomic(sweep.cell_path(str(workdir), cell),
                               {"cell": dataclasses.asdict(cell), "runs": runs})
    records = sweep.finished(config, str(tmp_path))
    assert len(records) == len(cells) and all(len(r["runs"]) == 4 for r in records)
    fam = summary.summarize(records)["adam"]["mssp"]
    assert fam["opt_lr"] == [0.1, 0.1]
    assert fam["best_loss"][0] == pytest.approx(1.6)  # mean of seed 0 (1.1) and seed 1 (2.1)
    assert fam["best_loss_std"][0] == pytest.approx(0.5)


def test_transformer_base_tuning_runs_its_knobs_then_the_tuned_lr_cells(tmp_path):
    """tune=base: the multiplier cell (every knob names a Transformer role, or training fails)
    comes first and the MSSP LR cells carry its best point."""
    config = sweeps_transformer_x8.get_config("regime=III,tune=base")
    config.quick = True
    config = sweep.prepare(config)
    config.sweep.multipliers.use = ("lr_embedding", "init_hidden")
    cells = sweep.plan(config)
    assert cells[0] == sweep.Cell("mult", "III", "adam", "mssp", 1)
    assert sweep.main(config, str(tmp_path)) == 0
    mult = sweep.load_cell(str(tmp_path), cells[0])
    assert [p["knobs"] for p in mult["points"]] == [
        {}, {"lr_embedding": 0.25}, {"lr_embedding": 4.0}, {"init_hidden": 0.25},
        {"init_hidden": 4.0}]
    knobs, _ = sweep.best_multipliers(str(tmp_path), config, "adam")
    assert sweep.load_cell(str(tmp_path), cells[1])["multiplier_knobs"] == knobs


def test_a_multiplier_for_a_role_the_model_lacks_is_an_error():
    labels = {"a": "embedding", "b": "readout"}
    assert vmap_train.role_factors(labels, {"readout": 2.0}) == {"a": 1.0, "b": 2.0}
    with pytest.raises(ValueError, match=r"\['input'\] are not roles of this model"):
        vmap_train.role_factors(labels, {"input": 2.0})


def test_extension_folders_widen_the_grid_of_their_sweep(tmp_path):
    """A sweep of the same cells with more LRs inside the workdir (here `wider/`): its runs join
    the cells (once, also when named in merge_workdirs), so an optimum can leave the old edge."""
    config = quick(sweeps_mlp_moe)
    cells = [c for c in sweep.plan(config) if c.kind == "lr"]
    for workdir, lrs in ((tmp_path, (0.1, 0.2)), (tmp_path / "wider", (0.4,))):
        for cell in cells:
            runs = [{"lr": lr, "seed": 0, "eval_loss": 1.0 - lr, "diverged": False} for lr in lrs]
            sweep.write_atomic(sweep.cell_path(str(workdir), cell),
                               {"cell": dataclasses.asdict(cell), "runs": runs})
    assert sweep.extensions(str(tmp_path)) == [str(tmp_path / "wider")]
    config.sweep.merge_workdirs = (str(tmp_path / "wider") + "/",)
    records = sweep.finished(config, str(tmp_path))
    assert all(sorted(r["lr"] for r in rec["runs"]) == [0.1, 0.2, 0.4] for rec in records)
    assert summary.summarize(records)["adam"]["mssp"]["opt_lr"] == [0.4, 0.4]


@pytest.mark.parametrize("grow, width, depth",
                         [("width", 64, 2), ("depth", 32, 8), ("both", 64, 4)])
def test_a_cell_grows_width_depth_or_both_and_names_its_depth_rule(grow, width, depth):
    c = sweeps_depth.get_config("grow=depth")
    c.sweep.grow = grow
    scale = 2 if grow != "depth" else 4
    cell = sweep.Cell("lr", "III", "adam", "mssp+depth_mup", scale)
    cc = sweep.cell_config(c, cell)
    assert (cc.shape.width, cc.shape.depth) == (width, depth)
    assert (cc.parameterization, cc.depth_scaling) == ("mssp", "depth_mup")
    assert sweep.cell_config(c, dataclasses.replace(cell, parameterization="mup")).depth_scaling \
        == c.depth_scaling  # a plain preset name keeps the config's depth rule


def test_sweep_rejects_an_unknown_growth_axis():
    c = sweeps_depth.get_config("grow=both")
    c.sweep.grow = "height"
    with pytest.raises(ConfigError,
                       match=r"sweep.grow must be one of \['width', 'depth', 'both'\]"):
        sweep.validate(c)


def _record(cell: sweep.Cell, losses: dict[float, float]) -> dict:
    return {"cell": dataclasses.asdict(cell),
            "runs": [{"lr": lr, "seed": 0, "eval_loss": loss, "diverged": loss is None}
                     for lr, loss in losses.items()]}


def test_widened_adds_grid_steps_beyond_each_end_that_holds_an_optimum():
    cell = sweep.Cell("lr", "II", "sgd", "sp", 1)
    interior = _record(cell, {0.25: 2.0, 0.5: 1.0, 1.0: 3.0})
    high = _record(cell, {0.25: 3.0, 0.5: 2.0, 1.0: 1.0})
    low = _record(cell, {0.25: 1.0, 0.5: 2.0, 1.0: None})  # the top diverged: low end only
    assert sweep.widened([interior, interior], 2.0, 2) == []
    assert sweep.widened([interior, high], 2.0, 2) == [2.0, 4.0]  # one scale is enough
    assert sweep.widened([low, high], 2.0, 1) == [0.125, 2.0]
    assert sweep.widened([low], 2.0, 3) == [0.03125, 0.0625, 0.125]
    with pytest.raises(ConfigError, match="increasing geometric LR grids"):
        sweep.grid_ratio((0.1, 0.2, 0.5))


def test_edge_rounds_are_planned_from_the_rounds_before_them(tmp_path):
    """Round r sees the base cells and rounds < r only, so a resumed sweep plans the same LRs."""
    config = quick(sweeps_mlp_moe)
    config.quick = False  # prepared already: keep the changes below
    config.sweep.update(extend_edges=2, extend_by=1, parameterizations=("mssp",))
    config.sweep.multipliers.enabled = False
    config.sweep.lr_grids.adam = (0.1, 0.2)
    cells = [c for c in sweep.plan(config) if c.kind == "lr"]
    def write(folder, lrs):  # loss 1 - lr: the optimum sits on the high end at every round
        for c in cells:
            sweep.write_atomic(sweep.cell_path(str(folder), c), _record(c, {x: 1 - x for x in lrs}))

    write(tmp_path, (0.1, 0.2))
    for round_, lr in ((1, 0.4), (2, 0.8)):
        assert [x[2] for x in sweep.edge_work(config, str(tmp_path), round_)] == [[lr]] * 2
        write(tmp_path / f"edge-{round_}", (lr,))
    assert [x[2] for x in sweep.edge_work(config, str(tmp_path), 1)] == [[0.4]] * 2  # as before
    work = [path for path, _, _ in sweep.all_work(config, str(tmp_path))]
    assert len(work) == 6 and all(map(os.path.exists, work))  # round 3 exceeds extend_edges
    fam = summary.summarize(sweep.finished(config, str(tmp_path)))["adam"]["mssp"]
    assert fam["lrs"] == [0.1, 0.2, 0.4, 0.8] and fam["opt_lr"] == [0.8, 0.8]
    assert fam["opt_at_grid_edge"] == [True, True]


def test_a_sweep_trains_its_edge_rounds_then_resumes_with_nothing_to_do(tmp_path):
    config = quick(sweeps_mlp_moe)
    config.quick = False  # prepared already: keep the changes below
    config.sweep.update(extend_edges=1, extend_by=1, parameterizations=("mssp",))
    config.sweep.multipliers.enabled = False
    config.sweep.lr_grids.adam = (1e-3, 1e30)  # 1e30 diverges: the optimum is the low end
    status = sweep.run_sweep(config, str(tmp_path))
    edge = ["edge-1/lr-II-adam-mssp-x1", "edge-1/lr-II-adam-mssp-x2"]
    assert status["ran"] == ["lr-II-adam-mssp-x1", "lr-II-adam-mssp-x2", *edge]
    record = sweep.load_cell(str(tmp_path / "edge-1"), sweep.Cell("lr", "II", "adam", "mssp", 2))
    assert [r["lr"] for r in record["runs"]] == [pytest.approx(1e-36)]
    fam = summary.summarize(sweep.finished(config, str(tmp_path)))["adam"]["mssp"]
    assert fam["lrs"] == [pytest.approx(1e-36), 1e-3, 1e30] and fam["diverged"][1] == [0, 0, 1]
    assert sweep.run_sweep(config, str(tmp_path))["skipped"][-2:] == edge


def test_sweep_rejects_a_negative_number_of_edge_rounds():
    c = quick(sweeps_mlp_moe)
    c.sweep.extend_edges = -1
    with pytest.raises(ConfigError, match=r"sweep.extend_edges must be an integer >= 0, got -1"):
        sweep.validate(c)
