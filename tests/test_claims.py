"""experiments.claims: the verdicts follow from the numbers (synthetic cells with known optima)."""

import json
import os

import numpy as np
import pytest

from experiments import claims

LRS = (0.01, 0.1, 1.0, 10.0)


def cell(param: str, scale: int, optima: list[int], curve=(1.0, 0.9, 0.6, 0.5, 0.5)) -> dict:
    """An LR cell whose seed `s` has its lowest loss at grid index optima[s]; loss falls with
    scale (0.1 / scale at the optimum)."""
    runs = [dict(lr=lr, seed=s, eval_loss=0.1 / scale + 0.01 * abs(i - best), diverged=False,
                 curve_10=list(curve)) for s, best in enumerate(optima) for i, lr in enumerate(LRS)]
    return dict(cell=dict(kind="lr", regime="II", optimizer="adam", parameterization=param,
                          scale=scale), runs=runs)


def test_seed_drifts_are_each_seeds_own_range():
    assert claims.seed_drifts([cell("mssp", 1, [1, 2]), cell("mssp", 2, [3, 2])]) == [2, 0]


def test_half_time_is_the_first_logged_step_past_half_the_decrease():
    # decrease 1.0 -> 0.5: half is 0.75, first reached by the third 10-step block
    assert claims.half_time(cell("mup", 1, [0]), LRS[0]) == 30.0


def test_reversals_count_rises_beyond_the_seed_noise():
    f = dict(best_loss=[1.0, 1.1, 0.9, 0.905], best_loss_std=[0.01, 0.01, 0.01, 0.01])
    assert claims.reversals(f) == 1  # 0.9 -> 0.905 is within the noise


def last_row(section: str) -> str:
    return [r for r in section.splitlines() if r.startswith("|")][-1]


def column(section: str, name: str) -> str:
    """The last row's entry under the header `name`."""
    header = [c.strip()
              for c in next(r for r in section.splitlines() if r.startswith("|")).split("|")]
    return last_row(section).split("|")[header.index(name)].strip()


@pytest.fixture
def results(tmp_path):
    """A regime-II Adam sweep: MSSP stays at index 1, muP moves by 2, SP by 3."""
    cells = tmp_path / "II-adam-paper-mnist1d" / "cells"
    cells.mkdir(parents=True)
    optima = {"mssp": ([1, 1], [1, 1]), "mup": ([1, 1], [3, 3]), "sp": ([3, 3], [0, 0])}
    for param, per_scale in optima.items():
        for scale, opt in zip((1, 4), per_scale):
            (cells / f"lr-II-adam-{param}-x{scale}.json").write_text(
                json.dumps(cell(param, scale, opt)))
    return tmp_path


def test_report_gives_each_claim_its_verdict(results):
    sweeps = claims.load(str(results))
    assert [s.name for s in sweeps] == ["II adam paper mnist1d"]
    assert sweeps[0].table["mup"]["drift_steps"] == 2
    text = claims.report(str(results), None).split("**")  # heading, table, heading, table...
    assert [text[i][:3] for i in (1, 3, 5, 7, 9)] == ["Ver", "(a)", "(b)", "(c)", "(d)"]
    verdict = lambda i: column(text[i], "verdict")  # noqa: E731
    assert verdict(4) == "agree"  # (a) MSSP drift 0
    assert verdict(6) == "agree"  # (b) MSSP 0.1 -> 0.025
    assert verdict(8) == "agree"  # (c) muP drifts by 2 grid steps
    assert verdict(10) == "agree"  # (d) SP drifts by 3
    assert last_row(text[2]).endswith("| agree (0) | agree (0 rises) | agree (drift) | agree (3) |")


def test_a_routing_variant_is_its_own_sweep(results):
    (results / "II-adam-paper-mnist1d").rename(results / "II-adam-paper-mnist1d-soft")
    (sweep,) = claims.load(str(results))
    assert (sweep.name, sweep.folder) == ("II adam paper mnist1d soft",
                                          str(results / "II-adam-paper-mnist1d-soft"))
    assert f"`{sweep.folder}`" in claims.report(str(results), None)


def test_an_mssp_optimum_that_moves_is_a_disagreement(results):
    path = results / "II-adam-paper-mnist1d" / "cells" / "lr-II-adam-mssp-x4.json"
    path.write_text(json.dumps(cell("mssp", 4, [3, 3])))
    table = claims.transfer_table(claims.load(str(results)), "mssp", drifts=False)
    assert table.splitlines()[-1].endswith("| 2 (seeds 2-2) | disagree |")


def test_wall_hours_sum_the_recorded_cell_times_or_the_known_gaps(tmp_path):
    cells = tmp_path / "cells"
    cells.mkdir()
    for i, wall in enumerate((1800.0, 5400.0)):
        (cells / f"lr-{i}.json").write_text(json.dumps({"wall_s": wall}))
    assert str(claims.wall_hours(str(tmp_path))) == "2.0 h"
    for i in range(2, 5):  # older cells without wall_s, their file times a checkout stamp
        (cells / f"lr-{i}.json").write_text(json.dumps({}))
        os.utime(cells / f"lr-{i}.json", (1e9, 1e9))
    assert str(claims.wall_hours(str(tmp_path))) == "2.0 h for 2 of 5 cells"
    (cells / "lr-5.json").write_text(json.dumps({}))  # finished 600 s after lr-6, which is timed
    (cells / "lr-6.json").write_text(json.dumps({"wall_s": 0.0}))
    os.utime(cells / "lr-6.json", (2e9, 2e9))
    os.utime(cells / "lr-5.json", (2e9 + 1800, 2e9 + 1800))
    wall = claims.wall_hours(str(tmp_path))
    assert (wall.hours, wall.timed, wall.cells) == (2.5, 4, 7)
    for f in cells.iterdir():  # everything checked out again, nothing recorded
        f.write_text(json.dumps({}))
        os.utime(f, (3e9, 3e9))
    assert str(claims.wall_hours(str(tmp_path))) == "time not recorded"


def test_update_replaces_only_the_named_block(tmp_path):
    doc = tmp_path / "R.md"
    marks = lambda b, body: f"<!-- {b}: begin -->\n{body}\n<!-- {b}: end -->"  # noqa: E731
    doc.write_text(f"intro\n{marks('claims', 'old')}\nmid\n{marks('claims-t', 'old t')}\nend\n")
    claims.update(str(doc), "new")
    claims.update(str(doc), "new t", block="claims-t")
    assert doc.read_text() == (f"intro\n{marks('claims', 'new')}\nmid\n"
                               f"{marks('claims-t', 'new t')}\nend\n")
    doc.write_text("no marks")
    with pytest.raises(ValueError, match="no .* block"):
        claims.update(str(doc), "x")
    assert doc.read_text() == "no marks"


def test_a_sweep_whose_edge_round_is_under_way_is_not_judged(results):
    edge = results / "II-adam-paper-mnist1d" / "edge-1" / "cells"
    edge.mkdir(parents=True)
    widened = cell("sp", 1, [0, 0])
    widened["runs"] = [dict(r, lr=100.0) for r in widened["runs"] if r["lr"] == LRS[-1]]
    (edge / "lr-II-adam-sp-x1.json").write_text(json.dumps(widened))  # x4 not widened yet
    assert not claims.load(str(results))[0].complete
    (edge / "lr-II-adam-sp-x4.json").write_text(json.dumps(dict(widened, cell=dict(
        widened["cell"], scale=4))))
    assert claims.load(str(results))[0].complete


def test_a_running_sweep_is_named_but_not_judged(results):
    cells = results / "II-adam-paper-mnist1d" / "cells"
    (cells / "lr-II-adam-sp-x8.json").write_text(json.dumps(cell("sp", 8, [3, 3])))
    assert not claims.load(str(results))[0].complete
    text = claims.report(str(results), None)
    assert "still running, not judged: II adam paper mnist1d" in text
    assert "| II | adam |" not in text


def test_an_optimum_on_the_grid_edge_at_every_scale_is_inconclusive(results):
    cells = results / "II-adam-paper-mnist1d" / "cells"
    for scale in (1, 4):  # SP at the top of the grid at both scales: no drift visible
        (cells / f"lr-II-adam-sp-x{scale}.json").write_text(json.dumps(cell("sp", scale, [3, 3])))
    table = claims.transfer_table(claims.load(str(results)), "sp", drifts=True)
    assert last_row(table).endswith("| inconclusive: optimum on the grid edge at every scale |")


def test_a_small_drift_ending_on_the_grid_edge_is_inconclusive(results):
    """SP one step apart, the larger scale's optimum at the grid's top: it may lie further out."""
    cells = results / "II-adam-paper-mnist1d" / "cells"
    for scale, opt in ((1, [2, 2]), (4, [3, 3])):
        (cells / f"lr-II-adam-sp-x{scale}.json").write_text(json.dumps(cell("sp", scale, opt)))
    table = claims.transfer_table(claims.load(str(results)), "sp", drifts=True)
    assert last_row(table).endswith("| inconclusive: drift >= 1, optimum on the grid edge at x4 |")


def test_the_mup_gap_is_relative_to_mssp_with_both_seed_stds():
    f = dict(best_loss=[1.1, 2.2], best_loss_std=[0.03, 0.0])
    g = dict(best_loss=[1.0, 2.0], best_loss_std=[0.04, 0.0])
    assert claims.gap(f, g, 0) == "+10.0±5.0%"
    assert claims.gap(f, g, -1) == "+10.0±0.0%"
