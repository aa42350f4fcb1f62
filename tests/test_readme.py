"""The README stays true: its first lines are the two commands, CI runs the test command, and every
other command and Python block in it runs (the main job itself is run by .ci/run)."""

from __future__ import annotations

import json
import pathlib
import re
import shlex
import subprocess
import sys

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


def run_py_commands() -> list[str]:
    return [line.strip() for block in blocks("bash")[1:] for line in block.splitlines()
            if line.strip().startswith("python3 run.py")]


def test_every_describe_command_in_the_readme_runs():
    commands = run_py_commands()
    assert any("describe" in c for c in commands)
    for command in commands:
        if " describe " not in f" {command} ":
            continue
        args = shlex.split(command)[1:]
        out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        if "--json" in args:
            rows = json.loads(out.stdout)
            assert {"path", "role", "shape", "init_std", "multiplier", "lr_scale",
                    "eps_scale"} <= set(rows[0])
        else:
            assert "parameterization=" in out.stdout and "expert_down" in out.stdout


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
