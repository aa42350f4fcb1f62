#!/usr/bin/env bash
# Builds the API reference of mssp_jax from its docstrings with pdoc (pdoc==16.0.0).
# Usage: docs/build_api.sh [output_dir]   (default build/api; open <output_dir>/index.html)
# Any pdoc warning (an unresolvable annotation, a broken docstring, ...) fails the build.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-build/api}"
modules=$(python3 -c "import pkgutil, mssp_jax
print(' '.join('mssp_jax.' + m.name for m in pkgutil.iter_modules(mssp_jax.__path__)
               if not m.name.startswith('_')))")
# shellcheck disable=SC2086  # one argument per module
python3 -W error::UserWarning -m pdoc --output-directory "$out" mssp_jax $modules
