"""run.py as a newcomer meets it: --help, describe --fields, and every mistake as one line naming
the field (or file, argument, mode) and its allowed values, exit status 2, before any work."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from configs import cli, mlp_moe, sweeps_x16
from mssp_jax.scaling import ConfigError

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


MISTAKES = {  # arguments -> what the one line must say
    "missing config file": (["--config", "configs/does_not_exist.py"],
                            ["configs/does_not_exist.py", "no such file", "configs/mlp_moe.py"]),
    "unknown field": (["--config.shape.topk=99"], ["shape.topk", "did you mean shape.top_k"]),
    "field used as a block": (["--config.model.top_k=99"],
                              ["model.top_k", "model is a field", "shape.top_k"]),
    "bad config argument": (["--config", "configs/mlp_moe.py:regime=IV"],
                            ["regime", "'IV'", "['II', 'I', 'III']"]),
    "bad optimizer name": (["--config.optimizer.name=adamw"],
                           ["optimizer.name", "['sgd', 'adam']", "'adamw'"]),
    "bad loss name": (["--config", "configs/mlp_moe.py", "--config.loss=l1"],
                      ["loss", "['mse', 'cross_entropy']", "'l1'"]),
    "value of the wrong type": (["--config.steps=many"], ["--config.steps=many", "int", "400"]),
    "value for a block": (["--config.shape=3"], ["shape is a block", "top_k"]),
    "unknown mode": (["trian"], ["'trian'", "did you mean train", "coord_check"]),
    "two modes": (["train", "eval"], ["'train eval'", "one at most"]),
    "mode without its block": (["sweep", "--config", "configs/mlp_moe.py"],
                               ["sweep", "configs/mlp_moe.py"]),
    "unknown flag": (["--workdri=x"], ["workdri", "workdir"]),
}


@pytest.mark.parametrize("name", MISTAKES)
def test_a_mistake_is_one_line_exit_2_and_nothing_done(name, tmp_path):
    args, said = MISTAKES[name]
    workdir = tmp_path / "run"
    out = run(*args, f"--workdir={workdir}")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    (line,) = out.stderr.splitlines()
    for text in said:
        assert text in line, line
    assert not workdir.exists()  # nothing was written


def test_help_lists_modes_config_files_and_how_to_see_fields():
    out = run("--help")
    assert out.returncode == 0 and out.stderr == ""
    for mode in cli.MODES:
        assert f"\n  {mode} " in out.stdout
    files = cli.config_files()
    assert {"configs/mlp_moe.py", "configs/transformer_moe.py", "configs/sweeps_mlp_moe.py",
            "configs/paper/mlp_moe.py"} <= set(files)
    assert "configs/common.py" not in files and "configs/cli.py" not in files
    for name, doc in files.items():  # one line each, from the module docstring
        assert doc and f"  {name}" in out.stdout and doc in out.stdout
    assert "run.py describe --config configs/mlp_moe.py --fields" in out.stdout


def test_describe_fields_prints_every_field_with_its_value():
    out = run("describe", "--config", "configs/mlp_moe.py:regime=III,scale=2",
              "--config.steps=7", "--config.optimizer.name=sgd", "--fields")
    assert out.returncode == 0, out.stderr
    printed = {k.strip(): v for k, v in (line.split(" = ", 1) for line in out.stdout.splitlines())}
    expected = cli.flatten(mlp_moe.get_config("regime=III,scale=2"))
    assert set(printed) == set(expected)
    assert printed["steps"] == "7" and printed["optimizer.name"] == "'sgd'"
    assert printed["shape.width"] == "128" and printed["regime"] == "'III'"


@pytest.mark.parametrize("path", sorted(cli.config_files()))
def test_every_config_rejects_an_unknown_argument(path):
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    module.get_config()  # the defaults are valid
    with pytest.raises(ConfigError, match="unknown name 'nosuch'; allowed names"):
        module.get_config("nosuch=1")


def test_config_arguments_name_their_allowed_values():
    assert mlp_moe.get_config("scale=2,task=binary,regime=I").shape.width == 128
    with pytest.raises(ConfigError, match=r"scale must be a positive integer, got 'two'"):
        mlp_moe.get_config("regime=II,scale=two")
    with pytest.raises(ConfigError, match=r"task must be one of \['multiclass', 'binary'\]"):
        mlp_moe.get_config("task=ternary")
    with pytest.raises(ConfigError, match=r"'dat=teacher': unknown name 'dat'; allowed names "
                                          r"\['regime', 'optimizer', 'data'"):
        sweeps_x16.get_config("regime=II,dat=teacher")
