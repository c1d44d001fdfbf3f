"""First-letter prompts for the absorption metric, as SAEBench builds them, and the model's activation at the word.

SAEBench 0.6.0, sae_bench/evals/absorption/: vocab.py (the vocabulary), prompting.py (the prompt),
probing.py (the split). A `random.Random` seeded by the caller makes the same calls in the same order as
SAEBench's module-level `random` does, so `random.seed(s)` there gives the same prompts as `Random(s)` here.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from tqdm import tqdm

from mfr_sae.data.lm_model import bos_token_id, context_length, outputs_at
from mfr_sae.data.vectors import DataError

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = "{word} has the first letter:"  # eval_config.py:34 (prompt_template)
N_ICL = 10  # ICL examples per prompt: probing.py:252, feature_absorption.py:210
TRAIN_FRACTION = 0.8  # probing.py:253 (train_test_fraction)
MAX_ATTEMPTS = 1000  # prompting.py:81: draws of examples that leave the word out, before giving up


def alpha_vocab(tokenizer: Any) -> list[str]:
    """Every token whose text is letters only, with an optional leading space (vocab.py get_alpha_tokens),
    in token-id order: a fast tokenizer's vocab dict has no fixed order, and the split must be reproducible."""
    vocab = tokenizer.get_vocab()
    words = []
    for token in sorted(vocab, key=vocab.__getitem__):
        word = _token_text(tokenizer, token)
        bare = word[1:] if word.startswith(" ") else word
        if bare and bare.isascii() and bare.isalpha():
            words.append(word)
    return words


def _token_text(tokenizer: Any, token: str) -> str:
    text: str = tokenizer.convert_tokens_to_string([token])
    if token.startswith("▁") and not text.startswith(" "):  # vocab.py:27-32: Mistral drops the leading space
        text = " " + text
    return text


def split_vocab(vocab: Sequence[str], rng: random.Random) -> tuple[list[str], list[str]]:
    """(train, test) words, 80/20 after a shuffle (probing.py:276-281)."""
    shuffled = rng.sample(list(vocab), len(vocab))
    cut = int(len(shuffled) * TRAIN_FRACTION)
    return shuffled[:cut], shuffled[cut:]


def first_letter(word: str) -> str:
    """ " C" for "cat" or " cat" (prompting.py first_letter: stripped, letters only, capitalised, spaced)."""
    return " " + next(c for c in word.strip() if c.isalpha()).upper()


def letter_index(word: str) -> int:
    return LETTERS.index(first_letter(word).strip().lower())


def icl_prompt(word: str, examples: Sequence[str], rng: random.Random) -> str:
    """N_ICL example lines and the word's line, each after a newline (prompting.py:72-142 create_icl_prompt with
    prepend_separator_to_first_example=True, probing.py:258); examples are redrawn until the word is not one."""
    for _ in range(MAX_ATTEMPTS):
        chosen = rng.sample(examples, N_ICL)
        if word not in chosen:
            break
    else:
        raise DataError(f"no {N_ICL} ICL examples without {word!r} in {MAX_ATTEMPTS} draws")
    lines = [TEMPLATE.format(word=ex) + first_letter(ex) for ex in chosen]
    return "\n" + "\n".join(lines) + "\n" + TEMPLATE.format(word=word)


def tokenize(tokenizer: Any, prompt: str) -> tuple[list[int], int]:
    """(token ids, position of the word's last token). SAEBench reads a fixed position (-6 from the end); the
    position here is where the prompt's tokens up to the word end, so another tokenizer cannot shift it."""
    head = [bos_token_id(tokenizer)]
    ids = head + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    word_end = len(prompt) - len(TEMPLATE.format(word=""))
    upto = head + tokenizer(prompt[:word_end], add_special_tokens=False)["input_ids"]
    if ids[: len(upto)] != upto:
        raise DataError(f"the word's tokens run into the template's in {prompt.splitlines()[-1]!r}")
    return ids, len(upto) - 1


def word_activations(
    model: nn.Module, module: nn.Module, tokenizer: Any, prompts: Sequence[str], batch_size: int, progress: bool
) -> Tensor:
    """The hooked module's output at each prompt's word token [n, d], float32 on the CPU (`outputs_at`)."""
    tokens = [tokenize(tokenizer, p) for p in prompts]
    limit = context_length(model)
    longest = max((len(ids) for ids, _ in tokens), default=0)
    if limit is not None and longest > limit:
        raise DataError(f"first-letter prompts of {longest} tokens exceed the model's context of {limit}")
    ids, positions = [ids for ids, _ in tokens], [pos for _, pos in tokens]
    with tqdm(total=len(ids), desc="absorption: activations", unit="prompt", disable=not progress) as bar:
        return outputs_at(model, module, ids, positions, batch_size, bar.update)
