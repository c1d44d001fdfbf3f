"""What an SAE architecture is (`sae.architecture`), and the registry of them by name, as SAELens registers its
SAE classes: how a member chooses its kept latents in training and once saved, what state it keeps beside its
weights, how it is saved for SAELens, and its own options.

An architecture is a subclass of `Architecture` in a module of its own, registered with `@register`. Its options
are a dataclass (`Options`) whose fields are config keys `sae.<name>_<field>` (Matryoshka's `widths`:
`sae.matryoshka_widths`): the architecture checks them, saves them in cfg.json and is rebuilt from them, so a
new one needs no edit elsewhere. architectures.py imports the built-in ones and resolves a name. This module
imports nothing of the package but kernels: what it reads of an ensemble is the `Members` protocol.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from torch import Tensor

from mfr_sae.kernels import Selector


class Members(Protocol):
    """What an architecture reads of the ensemble it serves (ensemble.py's Ensemble)."""

    @property
    def ks(self) -> list[int]: ...
    @property
    def k_max(self) -> int: ...
    @property
    def d_sae(self) -> int: ...
    @property
    def training(self) -> bool: ...
    @property
    def k_mask(self) -> Tensor: ...
    @property
    def W_enc(self) -> Tensor: ...
    def get_buffer(self, target: str) -> Tensor: ...


class Replicas(Protocol):
    """What an architecture asks of the processes that share a member's batch (distributed.py's Shard)."""

    def min_replicas(self, values: Tensor) -> Tensor: ...


@dataclass
class NoOptions:
    """An architecture without options of its own."""


ARCHITECTURES: dict[str, type[Architecture]] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    """Make an architecture available to `sae.architecture` under its name."""
    ARCHITECTURES[cls.name] = cls
    return cls


def option_key(cls: type[Architecture], field: str) -> str:
    """The config key (under `sae`) of an architecture's option: `<name>_<field>`."""
    return f"{cls.name}_{field}"


def option_fields() -> dict[str, tuple[type[Architecture], dataclasses.Field[Any]]]:
    """Every registered architecture's options by config key: (the architecture, the field of its Options)."""
    return {
        option_key(cls, f.name): (cls, f)
        for cls in ARCHITECTURES.values()
        for f in dataclasses.fields(cls.Options)
        if "Options" in vars(cls)  # an architecture's own options, not those it inherits
    }


def option_default(field: dataclasses.Field[Any]) -> Any:
    """The value an option takes when it is not set."""
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def option_types(cls: type[Architecture]) -> dict[str, Any]:
    """An architecture's option fields -> their types (annotations that may be text)."""
    return typing.get_type_hints(cls.Options)


class Architecture:
    """What every architecture answers; the defaults are those of one with no state or options of its own."""

    name: ClassVar[str]
    saved_as: ClassVar[str]  # SAELens's architecture of the saved (inference) form
    Options: ClassVar[type] = NoOptions

    def __init__(self, d_sae: int, options: Mapping[str, Any] | None = None):
        """options: by config key (`<name>_<field>`); keys of other architectures are not taken. ValueError on
        an option that cannot work, naming its config key."""
        prefix = f"{self.name}_"
        own = {key.removeprefix(prefix): v for key, v in (options or {}).items() if key.startswith(prefix)}
        known = {f.name for f in dataclasses.fields(self.Options)}
        for name in own:
            if name not in known:
                raise ValueError(f"sae.{prefix}{name}: {self.name} has no option {name!r} (it has: {sorted(known)})")
        self.d_sae = d_sae
        self.opts = self.Options(**own)

    def options(self) -> dict[str, object]:
        """Its options by config key, as they rebuild it (saved under `mfr_sae` in cfg.json)."""
        return {option_key(type(self), f.name): getattr(self.opts, f.name) for f in dataclasses.fields(self.opts)}

    def prefix_ends(self, ensemble: Members) -> Tensor | None:
        """Matryoshka: the end of each nested prefix of latents [G], each reconstructing on its own in training."""
        return None

    def state(self, n_members: int) -> dict[str, Tensor]:
        """Buffers [N, ...] the ensemble keeps for it (saved and loaded with the members' weights)."""
        return {}

    def selector(self, ensemble: Members) -> tuple[Selector, Tensor | None]:
        """How the ensemble's members keep latents now (ensemble.training: the training form, else the saved
        one), and a mask [N, 1, k'] of the slots each member may use (None: all)."""
        raise NotImplementedError

    def after_step(self, ensemble: Members, acts: Tensor, replicas: Replicas) -> None:
        """After a training step's forward pass (acts [n, B, k']: this rank's kept activations)."""

    def saelens_fields(self, ensemble: Members, i: int) -> dict[str, object]:
        """Member i's cfg.json fields for SAELens's `saved_as` architecture (beyond the common ones)."""
        return {"k": ensemble.ks[i]}

    def saved_tensors(self, ensemble: Members, i: int) -> dict[str, Tensor]:
        """Member i's tensors beside SAELens's four weights."""
        return {}

    def load_tensors(self, ensemble: Members, i: int, tensors: dict[str, Tensor]) -> None:
        """Member i's state from its saved tensors (`saved_tensors`)."""
