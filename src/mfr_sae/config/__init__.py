"""Run configuration: `fields` (the sections' dataclasses, their docstrings as help text, PAPER_MFR), `run`
(RunConfig: the sections together, and their validation) and `loading` (YAML files, `--set
section.field=value` overrides, the --help text)."""

from mfr_sae.config.fields import (
    DATA_KINDS,
    EEG_NOISE_KINDS,
    FIRING_KINDS,
    MMCS_FORMS,
    PAPER_MFR,
    DataConfig,
    EvalConfig,
    MFRConfig,
    SAEConfig,
    TrainConfig,
    beta_parts,
)
from mfr_sae.config.loading import (
    field_docs,
    field_types,
    from_dict,
    help_text,
    load_config,
    load_run_config,
    parse_override,
    save_config,
    sections,
    set_field,
    settable_fields,
)
from mfr_sae.config.run import RunConfig
from mfr_sae.errors import ConfigError

__all__ = [
    "DATA_KINDS",
    "EEG_NOISE_KINDS",
    "FIRING_KINDS",
    "MMCS_FORMS",
    "PAPER_MFR",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "MFRConfig",
    "RunConfig",
    "SAEConfig",
    "TrainConfig",
    "beta_parts",
    "field_docs",
    "field_types",
    "from_dict",
    "help_text",
    "load_config",
    "load_run_config",
    "parse_override",
    "save_config",
    "sections",
    "set_field",
    "settable_fields",
]
