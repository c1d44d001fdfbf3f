"""Optional dependencies: a missing one is a one-line error that names the pip extra bringing it."""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> the extra of mfr-sae that installs it (pyproject.toml, [project.optional-dependencies])
EXTRAS = {"transformers": "lm", "gguf": "lm", "accelerate": "lm", "datasets": "lm", "mne": "eeg"}


class MissingExtra(RuntimeError):
    """An optional package that a command needs is not installed; the message says how to install it."""


def hint(module: str) -> str:
    return f'pip install "mfr-sae[{EXTRAS[module]}]"'


def require(module: str, what: str) -> ModuleType:
    """Import `module`, or raise MissingExtra: "<what> needs <module>: pip install "mfr-sae[<extra>]"."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        failed = (err.name or module).split(".")[0]  # the module itself, or one it imports in turn
        cause = "" if failed == module else f" (importing it failed: {str(err).splitlines()[0][:160]})"
        raise MissingExtra(f"{what} needs {module}{cause}: {hint(module)}") from None
