"""An ensemble of N SAEs held as stacked tensors (docs/design.md section 2).

Member n: z = ReLU(TopK_k[n](W_enc[n] (x - b_dec[n]) + b_enc[n])), x_hat = z W_dec[n] + b_dec[n]; other
architectures (architecture.py: `sae.architecture`) choose the kept latents otherwise.
W_enc is [N, h, d] with one latent per row. Tied (the paper's default): W_dec = W_enc with unit-norm
rows, computed in the forward pass. Untied: W_dec is its own parameter, kept at unit-norm rows.
Members may differ in k. Member n is initialised from (seed, member_ids[n]) alone, so any split of the
member axis (one slice per process) starts from the same weights as the whole ensemble.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mfr_sae.architectures import architecture_named
from mfr_sae.kernels import Selector, also_reading, sparse_decode, topk_encode
from mfr_sae.row_norms import unit_rows
from mfr_sae.seeding import INIT_STREAM, seeded_generator
from mfr_sae.tied_kernel import tied_topk


@dataclass
class EnsembleOutput:
    x_hat: Tensor
    """Reconstructions [N, B, d]."""
    acts: Tensor
    """Kept activations [N, B, k_max] (zero past a member's own k, and where ReLU clamps)."""
    idx: Tensor
    """Latent index of each kept activation [N, B, k_max]."""
    prefixes: Tensor | None = None
    """Matryoshka in training: the reconstruction of each nested prefix [G, N, B, d] (the last is x_hat)."""
    read_pre: Tensor | None = None
    """The pre-activations [B, R] of the latents the forward pass was asked to read (no gradient)."""


class Ensemble(nn.Module):
    """In training mode (nn.Module.train) members keep latents as their architecture trains; in eval mode as they
    are saved (for TopK the same; BatchTopK: JumpReLU)."""

    k_mask: Tensor  # a buffer (registered in __init__): [N, 1, k_max], True up to each member's k

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        ks: list[int],
        tied: bool = True,
        decoder_bias: bool = False,
        seed: int = 0,
        member_ids: list[int] | None = None,
        device: str | torch.device | None = None,
        shared_init: bool = False,
        architecture: str = "topk",
        architecture_options: Mapping[str, Any] | None = None,
    ):
        """architecture_options: the architecture's options by config key (`sae.<name>_<field>`)."""
        super().__init__()
        self.architecture = architecture_named(architecture, d_sae, architecture_options)
        n = len(ks)
        self.d_in, self.d_sae, self.ks, self.tied, self.seed = d_in, d_sae, list(ks), tied, seed
        self.shared_init = shared_init
        self.member_ids = list(range(n)) if member_ids is None else list(member_ids)
        if len(self.member_ids) != n:
            raise ValueError(f"{len(self.member_ids)} member ids for {n} members")
        self.W_enc = nn.Parameter(torch.empty(n, d_sae, d_in, device=device))
        self.b_enc = nn.Parameter(torch.zeros(n, d_sae, device=device))
        self.W_dec = None if tied else nn.Parameter(torch.empty(n, d_sae, d_in, device=device))
        self.b_dec = nn.Parameter(torch.zeros(n, d_in, device=device)) if decoder_bias else None
        k_mask = torch.arange(max(ks)) < torch.tensor(ks).view(-1, 1)  # [N, k_max]
        self.register_buffer("k_mask", k_mask.view(n, 1, -1).to(device), persistent=False)
        for name, value in self.architecture.state(n).items():
            self.register_buffer(name, value.to(device))
        for i in range(n):
            self.reset_member(i)

    @contextlib.contextmanager
    def as_saved(self) -> Iterator[Ensemble]:
        """Inside, members keep latents as they are saved (eval mode: BatchTopK's JumpReLU); the mode after is the
        one before."""
        training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(training)

    def architecture_state(self) -> dict[str, Tensor]:
        """The buffers [N, ...] the architecture keeps beside the weights (BatchTopK: its threshold), by name."""
        return {name: getattr(self, name) for name in self.architecture.state(1)}

    def weights_and_state(self) -> list[tuple[str, Tensor]]:
        """Every tensor [N, ...] that makes the members what they are: the parameters and the architecture's
        state, by name (what a shard, a gathered checkpoint or a restore copies)."""
        return [*self.named_parameters(), *self.architecture_state().items()]

    @property
    def n_members(self) -> int:
        return len(self.ks)

    @property
    def k_max(self) -> int:
        return max(self.ks)

    @torch.no_grad()
    def reset_member(self, i: int, attempt: int = 0) -> None:
        """(Re)initialise member i: encoder ~ U(-1/sqrt(d), 1/sqrt(d)) as nn.Linear, biases zero.

        `attempt` > 0 draws a fresh initialisation (MFR reinitialisation), still seeded. With
        shared_init, every member's first initialisation is member 0's."""
        key = 0 if self.shared_init and attempt == 0 else self.member_ids[i]
        gen = seeded_generator(self.seed, INIT_STREAM, key, attempt)
        bound = 1 / math.sqrt(self.d_in)
        weight = (torch.rand(self.d_sae, self.d_in, generator=gen) * 2 - 1) * bound
        self.W_enc[i].copy_(weight)
        self.b_enc[i].zero_()
        if self.W_dec is not None:
            self.W_dec[i].copy_(F.normalize(weight, dim=-1))
        if self.b_dec is not None:
            self.b_dec[i].zero_()
        for name, initial in self.architecture.state(self.n_members).items():
            getattr(self, name)[i] = initial[i]

    @property
    def decoder_weight(self) -> Tensor:
        """The parameter whose rows, scaled to unit norm, are the decoder: W_enc when tied. [N, h, d]"""
        return self.W_enc if self.W_dec is None else self.W_dec

    def decoder(self) -> Tensor:
        """Decoder rows, unit norm: [N, h, d]."""
        return unit_rows(self.decoder_weight)

    @torch.no_grad()
    def renormalize_decoder(self) -> None:
        """Untied decoders are kept at unit-norm rows after every optimiser step (as in sparsify)."""
        if self.W_dec is not None:
            self.W_dec.copy_(F.normalize(self.W_dec, dim=-1))

    def _encoder_bias(self, x: Tensor) -> Tensor:
        """Checks x [B, d]; the bias of the encoder product."""
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"expected input of shape [batch, {self.d_in}], got {list(x.shape)}")
        if self.b_dec is None:
            return self.b_enc
        return self.b_enc - torch.einsum("nhd,nd->nh", self.W_enc, self.b_dec)  # W (x - b_dec) + b_enc

    def pre_activations_at(self, x: Tensor, latents: Tensor) -> tuple[Tensor, Tensor]:
        """The pre-activation of one latent per input, x [S, d], latents [S] (member * h + latent) -> [S], and the
        sum of its terms' magnitudes [S] (what its rounding error scales with)."""
        weight, bias = self.W_enc.flatten(0, 1)[latents], self.b_enc.flatten()[latents]
        if self.b_dec is not None:  # W (x - b_dec) + b_enc, for these latents only (not all N h, as encode)
            bias = bias - (weight * self.b_dec[latents // self.d_sae]).sum(-1)
        terms = x * weight
        return terms.sum(-1) + bias, terms.abs().sum(-1) + bias.abs()

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, d] -> (acts [N, B, k'], idx [N, B, k']); k' = k_max for TopK."""
        return self._encode(x, *self.architecture.selector(self))

    def _encode(self, x: Tensor, select: Selector, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        acts, idx = topk_encode(x, self.W_enc, self._encoder_bias(x), select)
        return (acts, idx) if mask is None else (acts * mask, idx)

    def decode(self, acts: Tensor, idx: Tensor, decoder: Tensor | None = None) -> Tensor:
        x_hat = sparse_decode(acts, idx, self.decoder() if decoder is None else decoder)
        if self.b_dec is not None:
            x_hat = x_hat + self.b_dec.unsqueeze(1)
        return x_hat

    def _decode_prefixes(self, acts: Tensor, idx: Tensor, ends: Tensor) -> Tensor:
        """The reconstruction of each nested prefix of latents [0, end) [G, N, B, d]."""
        decoder = self.decoder()
        groups = torch.bucketize(idx, ends, right=True)
        parts = torch.stack([sparse_decode(acts * (groups == g), idx, decoder) for g in range(len(ends))])
        prefixes = parts.cumsum(0)
        return prefixes if self.b_dec is None else prefixes + self.b_dec.unsqueeze(1)

    def forward(self, x: Tensor, read_latents: Tensor | None = None) -> EnsembleOutput:
        """Every member's reconstruction of x [B, d]; tied ensembles take the fused kernel (one weight
        gradient for encoder and decoder), untied ones encode then decode. read_latents (flat: member * h +
        latent): latents whose pre-activations the encoder product also hands out, as `read_pre`."""
        ends = self.architecture.prefix_ends(self)
        select, mask = self.architecture.selector(self)
        read: list[Tensor] = []
        if read_latents is not None:
            select, read = also_reading(select, read_latents)
        if self.W_dec is not None:
            acts, idx = self._encode(x, select, mask)
            x_hat = self._decode_prefixes(acts, idx, ends) if ends is not None else self.decode(acts, idx)
        else:
            x_hat, acts, idx = tied_topk(x, self.W_enc, self._encoder_bias(x), select, mask, ends)
            if self.b_dec is not None:
                x_hat = x_hat + self.b_dec.unsqueeze(1)
        read_pre = read[0] if read else None
        if ends is None:
            return EnsembleOutput(x_hat, acts, idx, read_pre=read_pre)
        return EnsembleOutput(x_hat[-1], acts, idx, x_hat, read_pre)

    def dense_codes(self, x: Tensor) -> Tensor:
        """Latent activations as a dense [N, B, h] tensor (for analysis, not training)."""
        acts, idx = self.encode(x)
        return acts.new_zeros(self.n_members, x.shape[0], self.d_sae).scatter(2, idx, acts)

    def select(self, members: list[int]) -> Ensemble:
        """A new ensemble holding copies of the given members (a shard of the member axis)."""
        part = Ensemble(
            self.d_in,
            self.d_sae,
            [self.ks[i] for i in members],
            self.tied,
            self.b_dec is not None,
            self.seed,
            [self.member_ids[i] for i in members],
            self.W_enc.device,
            self.shared_init,
            self.architecture.name,
            self.architecture.options(),
        )
        with torch.no_grad():
            for name, tensor in part.weights_and_state():
                tensor.copy_(getattr(self, name)[members])
        return part
