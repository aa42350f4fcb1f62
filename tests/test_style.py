"""Every line of the tracked Python code fits in 100 characters: legible code (STYLE) needs a
limit, and 100 is the one the codebase is written to; this keeps new lines inside it."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_LINE = 100


def tracked_python_files() -> list[pathlib.Path]:
    """The `*.py` files git tracks in this checkout (skips the test outside a git checkout)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    proc = subprocess.run(["git", "ls-files", "-z", "*.py"], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout: {proc.stderr.strip()}")
    return [ROOT / name for name in proc.stdout.split("\0") if name and (ROOT / name).is_file()]


def test_every_tracked_python_line_fits_the_limit():
    files = tracked_python_files()
    assert files, "git lists no Python files"
    offenders = [f"{path.relative_to(ROOT)}:{number} ({len(line)} chars)"
                 for path in files
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if len(line) > MAX_LINE]
    assert not offenders, (f"{len(offenders)} lines longer than {MAX_LINE} characters:\n"
                           + "\n".join(offenders))
