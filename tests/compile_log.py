"""What XLA's C++ logging writes to stderr (file descriptor 2) while programs compile."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

REMAT_WARNING = "Involuntary full rematerialization"  # XLA SPMD: a reshard it could only replicate


@contextlib.contextmanager
def stderr_lines() -> Iterator[list[str]]:
    """Collects the lines written to fd 2 inside the block (into the yielded list, on exit)."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:  # unlinked at once: nothing is left in /tmp
        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines.extend(capture.read().decode(errors="replace").splitlines())


def remat_warnings(lines: list[str]) -> list[str]:
    return [line for line in lines if REMAT_WARNING in line]
