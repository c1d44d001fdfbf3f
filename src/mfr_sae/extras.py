"""Optional dependencies: a missing one is a one-line error that names the pip extra bringing it."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import urllib.parse
from types import ModuleType

# module -> the extra of mfr-sae that installs it (pyproject.toml, [project.optional-dependencies])
EXTRAS = {
    "transformers": "lm",
    "gguf": "lm",
    "accelerate": "lm",
    "datasets": "lm",
    "mne": "eeg",
    "sae_lens": "synth",
    "sklearn": "evals",
}


class MissingExtra(RuntimeError):
    """An optional package that a command needs is not installed; the message says how to install it."""


def hint(module: str) -> str:
    """How to install the extra that brings `module`, for the way mfr-sae itself was installed: from a source
    checkout (`pip install -e DIR`, or `pip install DIR`: PEP 610's direct_url.json names DIR) the extra is
    installed from that folder, since mfr-sae is on no package index."""
    extra = EXTRAS[module]
    source = _source_folder()
    if source is None:
        return f'pip install "mfr-sae[{extra}]"'
    editable = "-e " if source[1] else ""
    return f'pip install {editable}"{source[0]}[{extra}]"'


def _source_folder() -> tuple[str, bool] | None:
    """(the folder mfr-sae was installed from, whether editably), or None for an install from an index."""
    try:
        text = importlib.metadata.distribution("mfr-sae").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not text:
        return None
    info = json.loads(text)
    url = info.get("url", "")
    if "dir_info" not in info or not url.startswith("file://"):
        return None
    return urllib.parse.unquote(urllib.parse.urlparse(url).path), bool(info["dir_info"].get("editable"))


def require(module: str, what: str) -> ModuleType:
    """Import `module`, or raise MissingExtra: "<what> needs <module>: pip install "mfr-sae[<extra>]"."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        failed = (err.name or module).split(".")[0]  # the module itself, or one it imports in turn
        cause = "" if failed == module else f" (importing it failed: {str(err).splitlines()[0][:160]})"
        raise MissingExtra(f"{what} needs {module}{cause}: {hint(module)}") from None
