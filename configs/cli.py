"""run.py's help and command-line checks: every mistake is one line on stderr and exit status 2.

absl's `config_flags` loads the config file and applies ``--config.<field>=<value>`` while it
parses flags, before `main`, and reports a missing file, an unknown field or a bad config argument
as a traceback. `parse_flags` (absl's `app.run(flags_parser=...)`) first checks the file, its
arguments and every field path itself, naming the field and its close matches, then lets absl
parse the values. Only absl and ml_collections are loaded here, so mistakes answer at once.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from absl import flags

MODES = {
    "train": "train in --workdir, resuming its latest checkpoint (the default mode)",
    "eval": "evaluate the latest checkpoint in --workdir",
    "describe": "the per-parameter table: role, shape, init std, multiplier, LR and eps scale "
                "(--json: as JSON; --fields: every config field and its value)",
    "sweep": "LR-transfer sweep over scales and parameterizations, resumable",
    "coord_check": "coordinate check: activations and updates vs width",
}
BLOCK_OF_MODE = {"train": "data", "eval": "data", "sweep": "sweep", "coord_check": "coord"}
DEFAULT_CONFIG = "configs/transformer_moe.py"
HELP = {"-h", "-help", "--help", "-?", "--helpshort", "help"}
USAGE = ("python3 run.py [MODE] --config configs/<file>.py[:<argument>=<value>,...] "
         "[--config.<field>=<value> ...] [--workdir DIR]")
CONFIGS_DIR = Path(__file__).resolve().parent
USAGE_ERROR = 2


class CommandLineError(Exception):
    """A mistake on the command line; the message is the one line printed."""


def config_files() -> dict[str, str]:
    """{'configs/<file>.py': first paragraph of its docstring} for every file with a get_config
    (read, not imported: some configs load JAX)."""
    files = {}
    for path in sorted(CONFIGS_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name == "get_config" for n in tree.body):
            name = path.relative_to(CONFIGS_DIR.parent).as_posix()
            files[name] = (ast.get_docstring(tree) or "").split("\n\n")[0].replace("\n", " ")
    return files


def help_text(flag_names: tuple[str, ...]) -> str:
    """What `run.py --help` prints: modes, config files, how to see and change fields, flags."""
    files = config_files()
    width = max(map(len, files)) + 2
    lines = [f"usage: {USAGE}", "", "Modes:"]
    lines += [f"  {mode:<13}{text}" for mode, text in MODES.items()]
    lines += ["", f"Config files (--config; default {DEFAULT_CONFIG}):"]
    lines += [f"  {name:<{width}}{doc}" for name, doc in files.items()]
    lines += ["",
              "Every field of a config and its value (change one with --config.<field>=<value>):",
              "  python3 run.py describe --config configs/mlp_moe.py --fields", "", "Flags:"]
    for name in flag_names:
        flag = flags.FLAGS[name]
        default = f" (default: {flag.default_as_str})" if flag.default is not None else ""
        lines.append(f"  --{name:<11}{flag.help}{default}")
    return "\n".join(lines)


def _is_block(value: Any) -> bool:
    return isinstance(value, Mapping) or hasattr(value, "to_dict")  # dict or ConfigDict


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{'shape.top_k': 2, ...}: every field of a config (an empty block is a field, {})."""
    out = {}
    for key in config:
        value, path = config[key], f"{prefix}{key}"
        if _is_block(value):
            out.update(flatten(value, path + ".") if len(value) else {path: {}})
        else:
            out[path] = value
    return out


def format_fields(config: Any) -> str:
    """`run.py describe --fields`: one 'field = value' line per field."""
    fields = flatten(config)
    width = max(map(len, fields), default=0)
    return "\n".join(f"{path:<{width}} = {value!r}" for path, value in fields.items())


def load_config(spec: str) -> Any:
    """The config of 'configs/<file>.py[:<arguments>]', as absl will load it."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        files = list(config_files())
        close = difflib.get_close_matches(path, files, n=1, cutoff=0.8)
        hint = f"did you mean {close[0]}? " if close else ""
        raise CommandLineError(f"--config {spec}: no such file; {hint}config files: "
                               f"{', '.join(files)} (python3 run.py --help describes them)")
    module_spec = importlib.util.spec_from_file_location("config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise CommandLineError(f"--config {spec}: SyntaxError: {e}") from e
    if not hasattr(module, "get_config"):
        raise CommandLineError(f"--config {spec}: not a config file (it has no get_config)")
    try:
        return module.get_config(*([arg] if arg else []))
    except ValueError as e:  # ConfigError from common.parse_args: names argument and values
        raise CommandLineError(f"--config {spec}: {e}") from e


def _suggest(fields: list[str], path: str) -> str:
    """'; did you mean a.b or c.b?': the fields with the same last name as `path`, else the one
    spelled most like it."""
    leaf = path.rsplit(".", 1)[-1]
    similarity = lambda f: difflib.SequenceMatcher(None, path, f).ratio()  # noqa: E731
    found = sorted((f for f in fields if f.rsplit(".", 1)[-1] == leaf), key=similarity,
                   reverse=True)[:2] or difflib.get_close_matches(path, fields, n=1)
    return f"; did you mean {' or '.join(found)}?" if found else ""


def check_field(config: Any, path: str, spec: str) -> None:
    """Raises CommandLineError unless `path` ('a.b.c') names a field of `config`."""
    fields = list(flatten(config))
    node, walked = config, []
    for part in path.split("."):
        if not _is_block(node):
            block = ".".join(walked)
            raise CommandLineError(
                f"--config.{path}: {block} is a field (= {node!r}), not a block of fields"
                f"{_suggest(fields, path[len(block) + 1:])}")
        if part not in node:
            block = ".".join(walked)
            where = f"{block} has no field {part!r}" if block else f"no field {part!r}"
            hint = (f" (fields of {block}: {', '.join(node)})" if block and len(node) <= 12 else
                    f" (every field: python3 run.py describe --config {spec} --fields)")
            raise CommandLineError(f"--config.{path}: {where}{_suggest(fields, path)}{hint}")
        node = node[part]
        walked.append(part)


def _value_error(error: flags.Error, config: Any) -> str:
    """absl's message for a value it cannot parse, with the field's type and current value."""
    message = str(error).splitlines()[0]
    m = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)", message)
    if not m:
        return message
    path, value, reason = m.groups()
    current = config
    for part in path.split("."):
        current = current[part]
    if _is_block(current):
        return (f"--config.{path}={value}: {path} is a block of fields ({', '.join(current)}); "
                f"set one with --config.{path}.<field>=<value>")
    return (f"--config.{path}={value}: {path} takes {type(current).__name__} values "
            f"(now {current!r}); {reason}")


def _config_arguments(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --config value, None if not given; the field path of every --config.<field>)."""
    spec, paths = None, []
    for i, arg in enumerate(argv):
        if re.match(r"^--?config(=|$)", arg):
            spec = (arg.split("=", 1)[1] if "=" in arg
                    else (argv[i + 1] if i + 1 < len(argv) else ""))
        elif m := re.match(r"^--?(?:no)?config\.([^=]+)", arg):
            paths.append(m.group(1))
    return spec, paths


def check_mode(rest: list[str], config: Any, spec: str) -> None:
    """One known mode at most, with a config that has the block the mode reads."""
    if len(rest) > 2 or (len(rest) == 2 and rest[1] not in MODES):
        close = difflib.get_close_matches(rest[1], MODES, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise CommandLineError(f"mode {' '.join(rest[1:])!r} is unknown; {hint}modes: "
                               f"{', '.join(MODES)} (one at most; see python3 run.py --help)")
    mode = rest[1] if len(rest) == 2 else "train"
    block = BLOCK_OF_MODE.get(mode)
    if block and block not in config:
        raise CommandLineError(f"mode {mode} reads the config's {block!r} block, which {spec} has "
                               "not (python3 run.py --help lists the config files)")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flags parser for run.py: --help, then the config file, its arguments and field
    paths, then absl's parse and the mode; a mistake prints one line and exits with status 2."""
    if HELP & set(argv[1:]):
        print(help_text(("config", "workdir", "json", "fields")))
        sys.exit(0)
    try:
        spec, paths = _config_arguments(argv)
        if spec is None:  # run.py's flag has no default (absl would load it at import)
            spec, argv = DEFAULT_CONFIG, [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
        config = load_config(spec)
        for path in paths:
            check_field(config, path, spec)
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as e:
            raise CommandLineError(_value_error(e, config)) from e
        check_mode(rest, config, spec)
    except CommandLineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    return rest
