"""SAE architectures by name (`sae.architecture`), as SAELens registers its SAE classes: how a member chooses its
kept latents in training and once saved, what state it keeps beside its weights, and how it is saved for SAELens.

An architecture is a subclass of `Architecture` in its own module, registered with `@register`; the ensemble,
trainer and checkpoints ask it by name. `topk` is here; batchtopk.py holds BatchTopK.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from mfr_sae.kernels import Selector, topk_selector

if TYPE_CHECKING:  # (distributed imports the config, which imports this)
    from mfr_sae.distributed import Shard
    from mfr_sae.ensemble import Ensemble

ARCHITECTURES: dict[str, type[Architecture]] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    """Make an architecture available to `sae.architecture` under its name."""
    ARCHITECTURES[cls.name] = cls
    return cls


def architecture_named(name: str, d_sae: int, widths: Sequence[int] = ()) -> Architecture:
    """The architecture `name` for members of d_sae latents (widths: Matryoshka's prefixes)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"sae.architecture={name!r}: must be one of {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name](d_sae, widths)


class Architecture:
    """What every architecture answers; the defaults are those of one with no state of its own."""

    name: ClassVar[str]
    saved_as: ClassVar[str]  # SAELens's architecture of the saved (inference) form

    def __init__(self, d_sae: int, widths: Sequence[int] = ()):
        """widths: Matryoshka's prefixes (matryoshka.py); the others take none."""

    def options(self) -> dict[str, object]:
        """What rebuilds it beside its name (saved under `mfr_sae` in cfg.json; `architecture_named`'s keywords)."""
        return {}

    def prefix_ends(self, ensemble: Ensemble) -> Tensor | None:
        """Matryoshka: the end of each nested prefix of latents [G], each reconstructing on its own in training."""
        return None

    def state(self, n_members: int) -> dict[str, Tensor]:
        """Buffers [N, ...] the ensemble keeps for it (saved and loaded with the members' weights)."""
        return {}

    def selector(self, ensemble: Ensemble) -> tuple[Selector, Tensor | None]:
        """How the ensemble's members keep latents now (ensemble.training: the training form, else the saved
        one), and a mask [N, 1, k'] of the slots each member may use (None: all)."""
        raise NotImplementedError

    def after_step(self, ensemble: Ensemble, acts: Tensor, shard: Shard) -> None:
        """After a training step's forward pass (acts [n, B, k']: this rank's kept activations)."""

    def saelens_fields(self, ensemble: Ensemble, i: int) -> dict[str, object]:
        """Member i's cfg.json fields for SAELens's `saved_as` architecture (beyond the common ones)."""
        return {"k": ensemble.ks[i]}

    def saved_tensors(self, ensemble: Ensemble, i: int) -> dict[str, Tensor]:
        """Member i's tensors beside SAELens's four weights."""
        return {}

    def load_tensors(self, ensemble: Ensemble, i: int, tensors: dict[str, Tensor]) -> None:
        """Member i's state from its saved tensors (`saved_tensors`)."""


@register
class TopK(Architecture):
    """TopK (Gao et al. 2024; the paper's SAE): each sample keeps each member's k largest pre-activations, in
    training and once saved. Members may differ in k: the slots beyond a member's own k are masked."""

    name = "topk"
    saved_as = "topk"

    def selector(self, ensemble: Ensemble) -> tuple[Selector, Tensor | None]:
        uniform = len(set(ensemble.ks)) == 1
        return topk_selector(ensemble.k_max, sorted=not uniform), None if uniform else ensemble.k_mask

    def saelens_fields(self, ensemble: Ensemble, i: int) -> dict[str, object]:
        return {"k": ensemble.ks[i], "rescale_acts_by_decoder_norm": False}


from mfr_sae import batchtopk, matryoshka  # noqa: E402, F401  (each registers itself)
