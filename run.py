"""mssp_jax command line:
python run.py <mode> --config configs/<file>.py [--config.<field>=<value>].

Modes: train (the default: `python run.py` runs the main job), eval, describe, sweep, coord_check;
`python run.py --help` lists them and the config files. Mistakes on the command line or in the
config print one line and exit with status 2 (configs/cli.py, mssp_jax.ConfigError).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from configs import cli

# No default here: config_flags would load it at import, before cli.parse_flags checks anything.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"Experiment config file (default {cli.DEFAULT_CONFIG}).", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where outputs are written.")
_JSON = flags.DEFINE_bool("json", False, "describe: print JSON instead of a table.")
_FIELDS = flags.DEFINE_bool("fields", False, "describe: print every config field and its value.")


def describe_main(config) -> None:
    from flax import nnx

    from mssp_jax import describe, factory

    scaling = factory.validate(config)
    model = nnx.eval_shape(lambda: factory.build_model(config, nnx.Rngs(0), scaling))
    rows = describe.describe(model, scaling, config.optimizer.learning_rate,
                             config.optimizer.get("eps", 1e-8))
    print(json.dumps(rows, indent=1) if _JSON.value else describe.format_table(rows, scaling))


def main(argv: list[str]) -> int:
    mode = argv[1] if len(argv) > 1 else "train"  # cli.parse_flags checked it
    config = _CONFIG.value
    if mode == "describe" and _FIELDS.value:
        print(cli.format_fields(config))
        return 0
    logging.set_verbosity(logging.WARNING)  # backend probing and orbax log at INFO
    from mssp_jax.scaling import ConfigError

    try:
        if mode == "describe":
            describe_main(config)
            return 0
        if mode in ("train", "eval"):
            from mssp_jax import train

            return train.main(mode, config, _WORKDIR.value)
        from experiments import coord_check, sweep

        return (sweep if mode == "sweep" else coord_check).main(config, _WORKDIR.value)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return cli.USAGE_ERROR


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
