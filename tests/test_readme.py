"""The README stays true: its first lines are the two commands, CI runs the test command, and every
other command and Python block in it runs (the main job itself is run by .ci/run)."""

from __future__ import annotations

import fnmatch
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SETUP_AND_RUN = 'python3 -m pip install -e . && python3 run.py'
SETUP_AND_TEST = 'python3 -m pip install -e ".[test]" && python3 -m pytest -q -n 2 tests'


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_first_lines_are_the_two_commands_and_ci_runs_them():
    first = blocks("bash")[0].strip().splitlines()
    assert first == [SETUP_AND_RUN, SETUP_AND_TEST]
    assert README.index("```bash") < 40  # right under the title
    ci = (ROOT / ".ci" / "run").read_text()
    assert SETUP_AND_TEST.split(" && ")[1] in ci and 'pip install -q -e ".[test]"' in ci
    assert "python3 run.py" in ci  # the main job runs in CI on the embedded default


# Run by tests/test_experiments.py through the same entry points (experiments.sweep.main,
# experiments.coord_check.main) with the same quick configs; not run twice.
RUN_ELSEWHERE = (" sweep ", " coord_check ")


def command_blocks(include_run_elsewhere: bool = False) -> list[list[str]]:
    """The README's `python3 run.py` command blocks after the first (which CI runs)."""
    found = [[line.strip() for line in block.splitlines() if "python3 run.py" in line]
             for block in blocks("bash")[1:]]
    if not include_run_elsewhere:
        found = [[c for c in b if not any(m in f" {c} " for m in RUN_ELSEWHERE)] for b in found]
    return [b for b in found if b]


def run(command: str, workdirs: pathlib.Path) -> tuple[subprocess.CompletedProcess, str | None]:
    """Runs `command` with its --workdir moved under `workdirs` (the same README path to the same
    place: a block's commands share outputs, and a later run of the README by hand starts fresh,
    nothing left in /tmp); returns the result and that workdir."""
    words = shlex.split(command)
    env = dict(os.environ)
    while "=" in words[0]:  # VAR=value prefixes
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[:2] == ["python3", "run.py"], command
    workdir = None
    if "--workdir" in words:
        i = words.index("--workdir") + 1
        workdir = words[i] = str(workdirs / pathlib.Path(words[i]).name)
    out = subprocess.run([sys.executable, *words[1:]], cwd=ROOT, capture_output=True, text=True,
                         timeout=900, env=env)
    return out, workdir


def test_package_metadata_has_no_deprecated_fields_and_ships_the_data():
    """setuptools >= 77 builds it without warnings: an SPDX license with its file, the embedded
    datasets as package data of mssp_jax.data; CI leaves the environment's pip alone."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, setup = meta["project"], meta["tool"]["setuptools"]
    assert project["license"] == "MIT"
    assert all((ROOT / name).is_file() for name in project["license-files"])
    assert "mssp_jax.data" in setup["packages"]
    shipped = [p.name for p in (ROOT / "mssp_jax" / "data").iterdir()]
    globs = setup["package-data"]["mssp_jax.data"]
    assert shipped and all(any(fnmatch.fnmatch(n, g) for g in globs) for n in shipped)
    assert "--upgrade pip" not in (ROOT / ".ci" / "run").read_text()


def test_readme_has_the_documented_commands():
    commands = [c for block in command_blocks(include_run_elsewhere=True) for c in block]
    for mode in ("describe", "train", "eval", "sweep", "coord_check"):
        assert any(f"run.py {mode} " in c for c in commands), mode


@pytest.mark.parametrize("index", range(len(command_blocks())))
def test_every_readme_command_runs(index, tmp_path):
    for command in command_blocks()[index]:  # in order: a block's later commands use its outputs
        assert "--workdir=" not in command  # written as --workdir DIR, which run() moves
        out, workdir = run(command, tmp_path)
        assert out.returncode == 0, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
        args = shlex.split(command)
        if "--help" in args:
            assert "configs/mlp_moe.py" in out.stdout and "--fields" in out.stdout
        elif " describe " in f" {command} ":
            if "--fields" in args:
                assert "shape.top_k" in out.stdout and "optimizer.name" in out.stdout
            elif "--json" in args:
                rows = json.loads(out.stdout)
                assert {"path", "role", "shape", "init_std", "multiplier", "lr_scale",
                        "eps_scale"} <= set(rows[0])
            else:
                assert "parameterization=" in out.stdout and "expert_down" in out.stdout
        elif " train " in f" {command} ":
            assert (pathlib.Path(workdir) / "metrics.jsonl").exists()


def test_readme_python_block_builds_an_mssp_optimizer():
    from mssp_jax import optim

    (block,) = blocks("python")
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)  # noqa: S102
    scaling, model = ns["scaling"], ns["model"]
    assert scaling.regime == "II"  # inferred, as the README says
    lr, eps = optim.lr_multipliers(scaling, model), optim.eps_multipliers(scaling, model)
    assert lr["moe"]["router"] == 0.25 and lr["moe"]["w_down"] == 1.0  # rN^-1 and rNe^-1, rN = 4
    assert eps["moe"]["w_down"] == 1 / 16  # (rN rM)^-1
    assert ns["optimizer"].opt_state is not None
