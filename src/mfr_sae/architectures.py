"""The architectures `sae.architecture` names: importing this module registers the built-in ones (each module
registers itself), and `architecture_named` builds one. A new architecture is its module and one line here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mfr_sae import batchtopk, matryoshka, topk  # noqa: F401  (each registers itself)
from mfr_sae.architecture import ARCHITECTURES, Architecture, option_fields

__all__ = ["ARCHITECTURES", "architecture_named", "option_fields"]


def architecture_named(name: str, d_sae: int, options: Mapping[str, Any] | None = None) -> Architecture:
    """The architecture `name` for members of d_sae latents, with its options (by config key). ValueError, naming
    the config key, on an unknown name or an option that cannot work."""
    if name not in ARCHITECTURES:
        raise ValueError(f"sae.architecture={name!r}: must be one of {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name](d_sae, options)
