"""First-letter feature absorption (Chanin et al., "A is for Absorption"), as SAEBench 0.6.0 measures it.

SAEBench cannot be a dependency (sae-bench 0.6.0 pins torchvision, which replaces torch with a CUDA build), so
its method is re-implemented from its code (sae_bench/evals/absorption/; files and lines cited where each step
or threshold comes from) on a Hugging Face causal LM, offline:

- `letter_probe` (once per model and hook): the first-letter prompts, the model's activations at the word, the
  ground-truth probe of the 26 letters and each letter's test F1; a letter counts when its F1 > 0.6, and absorption
  is measurable only when at least 20 letters count (main.py:111-118, eval_config.py:70,75).
- `absorption` (once per SAE): k-sparse probes on the SAE's latents, each letter's main latents, the absorption
  of each word the probe gets right, and the means over letters SAEBench reports.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from mfr_sae import absorption_probes as probes
from mfr_sae import absorption_prompts as prompts
from mfr_sae import absorption_scores as scores
from mfr_sae.data.lm_model import resolve_hook
from mfr_sae.data.vectors import DataError

MIN_F1 = 0.6  # eval_config.py:70 (min_GT_probe_f1): a letter the model knows
MIN_LETTERS = 20  # eval_config.py:75 (min_feats_for_eval): letters needed to measure absorption
# Words drawn from the tokenizer's alphabetic tokens (SmolLM2: 47,078; SAEBench takes them all; None here). Fewer
# words fail letters for want of data (rare letters have few test words): on SmolLM2-135M, 4,000 words passed 19-24
# letters at layers 3-15 (19 at layer 15: not measurable), 12,000 words 25-26 at layers 3 and 6. A prompt is ~90
# tokens; on 2 busy CPU cores this default took 8.5 minutes at layer 6 (~12 prompts a second; to layer 15, ~2.5x
# slower), seconds on a GPU: give more words, or None, where time allows.
N_WORDS = 4000


class Encoder(Protocol):
    """An SAE: dense latents [B, h] of inputs [B, d], and decoder rows W_dec [h, d]."""

    W_dec: Tensor

    def encode(self, x: Tensor) -> Tensor: ...


@dataclass
class LetterProbe:
    """What every SAE of a model and hook is scored against: the words' activations and the ground-truth probe."""

    hook: str
    seed: int
    n_vocab: int  # alphabetic tokens in the tokenizer
    train_acts: Tensor  # [n_train, d] at the word token
    train_letters: Tensor  # [n_train] first letters, 0..25
    test_acts: Tensor
    test_letters: Tensor
    weight: Tensor  # [26, d] the ground-truth probe
    bias: Tensor  # [26]
    letter_f1: dict[str, float]  # test F1 of logit > 0
    # test words the probe gets right, of the letters that count, re-run in prompts of fresh ICL examples
    scored_words: list[str] = field(default_factory=list)
    scored_acts: Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    scored_letters: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def passing(self) -> list[str]:
        return [letter for letter, score in self.letter_f1.items() if score > MIN_F1]

    @property
    def measurable(self) -> bool:
        return len(self.passing) >= MIN_LETTERS

    def summary(self) -> dict[str, Any]:
        """The probe's part of a result: JSON-serialisable."""
        return {
            "letters_passing": len(self.passing),
            "measurable": self.measurable,
            "letter_f1": {k: round(v, 4) for k, v in self.letter_f1.items()},
            "n_words": len(self.train_letters) + len(self.test_letters),
            "n_vocab": self.n_vocab,
            "hook": self.hook,
        }


def letter_probe(
    model: nn.Module,
    tokenizer: Any,
    hook: str,
    n_words: int | None = N_WORDS,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> LetterProbe:
    """The ground-truth first-letter probe at `hook` (`blocks.L.hook_resid_post` or an HF module path) on
    n_words alphabetic tokens (None: all), split 80/20 by word; prompts, split and probe are seeded by `seed`."""
    rng = random.Random(seed)  # SAEBench uses the unseeded module-level random
    vocab = prompts.alpha_vocab(tokenizer)
    words = vocab if n_words is None or n_words >= len(vocab) else rng.sample(vocab, n_words)
    train, test = prompts.split_vocab(words, rng)
    if len(test) <= prompts.N_ICL:
        raise DataError(f"{len(words)} words leave {len(test)} test words: {prompts.N_ICL + 1} are needed")
    texts = [prompts.icl_prompt(w, train, rng) for w in train] + [prompts.icl_prompt(w, test, rng) for w in test]
    module = resolve_hook(model, hook)[1]
    acts = prompts.word_activations(model, module, tokenizer, texts, batch_size, progress)
    letters = torch.tensor([prompts.letter_index(w) for w in train + test])
    probe = _fit(hook, seed, len(vocab), acts, letters, len(train), progress)
    if probe.measurable:
        _rerun_true_positives(probe, test, vocab, rng, (model, module, tokenizer), batch_size, progress)
    return probe


def _fit(hook: str, seed: int, n_vocab: int, acts: Tensor, letters: Tensor, n: int, progress: bool) -> LetterProbe:
    """The probe trained on the first n words, and its F1 on the rest."""
    weight, bias = probes.train_probe(acts[:n], letters[:n], seed=seed, progress=progress, desc="letter probe")
    f1 = probes.letter_f1(acts[n:] @ weight.T + bias, letters[n:])
    return LetterProbe(
        hook, seed, n_vocab, acts[:n], letters[:n], acts[n:], letters[n:], weight, bias, dict(zip(prompts.LETTERS, f1))
    )


def _rerun_true_positives(
    probe: LetterProbe,
    test: list[str],
    vocab: list[str],
    rng: random.Random,
    lm: tuple[nn.Module, nn.Module, Any],
    batch_size: int,
    progress: bool,
) -> None:
    """The words scored: each counting letter's test words whose probe logit is > 0 (feature_absorption.py:136-146),
    letter by letter, in prompts of ICL examples from the whole vocabulary (feature_absorption.py:206-210)."""
    logits = probe.test_acts @ probe.weight.T + probe.bias
    words, letters = [], []
    for letter in probe.passing:
        i = prompts.LETTERS.index(letter)
        hits = ((probe.test_letters == i) & (logits[:, i] > 0)).nonzero()[:, 0].tolist()
        words += [test[j] for j in hits]
        letters += [i] * len(hits)
    texts = [prompts.icl_prompt(w, vocab, rng) for w in words]
    probe.scored_words = words
    probe.scored_acts = prompts.word_activations(*lm, texts, batch_size, progress)
    probe.scored_letters = torch.tensor(letters, dtype=torch.long)


def absorption(
    encoder: Encoder, probe: LetterProbe, batch_size: int = 4096, seed: int = 0, progress: bool = False
) -> dict[str, Any]:
    """SAEBench's absorption metric of one SAE against `probe` (JSON-serialisable): mean_absorption_fraction_score,
    mean_full_absorption_score, mean_num_split_features, their std_dev_* and each letter's line; when fewer than
    MIN_LETTERS letters have a probe F1 > MIN_F1, {"measurable": False, ...} with the F1s and the reason."""
    if not probe.measurable:
        reason = (
            f"{len(probe.passing)} letters have a probe F1 > {MIN_F1} at {probe.hook}; SAEBench needs {MIN_LETTERS}"
        )
        return {"measurable": False, **probe.summary(), "reason": reason}
    decoder = encoder.W_dec.detach()
    train_z = probes.encode_all(encoder.encode, probe.train_acts, batch_size, decoder)
    test_z = probes.encode_all(encoder.encode, probe.test_acts, batch_size, decoder)
    sparse = probes.sparse_probe(train_z, probe.train_letters, seed, progress)
    letters = {}
    for letter in tqdm(probe.passing, desc="absorption: letters", disable=not progress):
        i = prompts.LETTERS.index(letter)
        main = probes.main_latents(sparse, i, (train_z, probe.train_letters), (test_z, probe.test_letters))
        rows = probe.scored_letters == i
        acts = probe.scored_acts[rows]
        z = probes.encode_all(encoder.encode, acts, batch_size, decoder)
        fractions, full = scores.word_absorption(acts, z, probe.weight[i], decoder.cpu(), main)
        letters[letter] = scores.letter_result(fractions, full, main)
    return {"measurable": True, **scores.means(letters), **probe.summary(), "letters": letters}
