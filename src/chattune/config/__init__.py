"""Typed run configuration: `schema` (the sections), `load` (YAML + overrides), `checks` (rules between keys)."""

from __future__ import annotations

from chattune import lazy_exports

# Public entry points, imported on first use: importing one stage never loads another's libraries.
_EXPORTS = {
    "Config": "chattune.config.schema",
    "ModelConfig": "chattune.config.schema",
    "DataConfig": "chattune.config.schema",
    "LoraConfig": "chattune.config.schema",
    "TrainConfig": "chattune.config.schema",
    "EvalConfig": "chattune.config.schema",
    "TrackConfig": "chattune.config.schema",
    "SweepConfig": "chattune.config.schema",
    "load_config": "chattune.config.load",
    "config_from_dict": "chattune.config.load",
    "parse_overrides": "chattune.config.load",
    "config_to_dict": "chattune.config.load",
    "dump_config": "chattune.config.load",
    "check_output_dir": "chattune.config.checks",
    "check_run_dir_unused": "chattune.config.checks",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
