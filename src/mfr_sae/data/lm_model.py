"""The language model side: a Hugging Face causal LM, the hooked module, and its output read or replaced.

- `load_model`: any `transformers` causal LM by hub name or local path (a folder saved with
  `save_pretrained`, or a `.gguf` file), in eval mode.
- `resolve_hook`: an HF module path (`transformer.h.0.mlp`) or a TransformerLens-style alias
  (`blocks.0.hook_mlp_out`, `hook_attn_out`, `hook_resid_post`) for GPT-2 and Llama-style models.
- `capture`: the hooked module's output, read with a forward hook that stops the forward right there,
  so extracting layer 0 costs one layer, not the whole model (the embeddings, token and position,
  run as in the real model).
- `splice`: within a block, the hooked module's output replaced by a function of it.
- `outputs_at`: the hooked module's output at one position of each of many token sequences (batched, padded).
- `bos_token_id`, `context_length`: the token a sequence starts with, and how many positions the model has.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from mfr_sae.data.vectors import DataError
from mfr_sae.extras import MissingExtra, hint, require

ALIAS = re.compile(r"^blocks\.(\d+)\.hook_(mlp_out|attn_out|resid_post)$")
BLOCK_PATHS = {"gpt2": "transformer.h", "llama": "model.layers"}
PART_NAMES = {"gpt2": {"mlp_out": "mlp", "attn_out": "attn"}, "llama": {"mlp_out": "mlp", "attn_out": "self_attn"}}


def load_model(name_or_path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer) from a hub name, a local folder, or a local .gguf file."""
    transformers = require("transformers", f"loading the language model {name_or_path!r}")
    path = Path(name_or_path)
    kwargs: dict[str, Any] = {}
    location = name_or_path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DataError(f"model file not found: {path}")
        require("gguf", f"reading the GGUF model {path}")
        location, kwargs = str(path.parent), {"gguf_file": path.name}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(location, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except ImportError as err:  # transformers asks for a package of its own (accelerate, sentencepiece, ...)
        raise MissingExtra(
            f"loading model {name_or_path!r} needs a package that is not installed "
            f"({str(err).splitlines()[0][:200]}); {hint('transformers')}"
        ) from None
    except (OSError, ValueError) as err:
        raise DataError(
            f"cannot load model {name_or_path!r} ({str(err).splitlines()[0][:160]}); without access to the "
            f"Hugging Face hub, pass a local path: a folder saved with save_pretrained or a .gguf file"
        ) from None
    return model.to(device).eval(), tokenizer


def model_family(model: nn.Module) -> str:
    for family, path in BLOCK_PATHS.items():
        try:
            model.get_submodule(path)
            return family
        except AttributeError:
            continue
    return "unknown"


def resolve_hook(model: nn.Module, hook: str) -> tuple[str, nn.Module]:
    """(HF module path, module) for an HF path or a TransformerLens-style alias."""
    match = ALIAS.match(hook)
    path = hook
    if match:
        family = model_family(model)
        if family == "unknown":
            raise DataError(
                f"hook {hook!r}: TransformerLens aliases are known for GPT-2 and Llama-style "
                f"models only; give the HF module path (e.g. model.layers.0.mlp)"
            )
        layer, part = match.groups()
        path = f"{BLOCK_PATHS[family]}.{layer}"
        if part != "resid_post":
            path += "." + PART_NAMES[family][part]
    try:
        return path, model.get_submodule(path)
    except AttributeError:
        raise DataError(f"hook {hook!r}: the model has no module {path!r}") from None


class _StopForward(Exception):
    pass


def _first(output: Any) -> Tensor:
    first: Tensor = output[0] if isinstance(output, tuple) else output
    return first


@torch.no_grad()
def capture(model: nn.Module, module: nn.Module, input_ids: Tensor) -> Tensor:
    """The module's output [B, L, d] for these tokens; the forward stops right after the module."""
    seen: dict[str, Tensor] = {}

    def hook(_module: nn.Module, _inputs: tuple[Any, ...], output: Any) -> NoReturn:
        seen["acts"] = _first(output)
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        model(input_ids=input_ids)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return seen["acts"]


@contextmanager
def splice(module: nn.Module, replace: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, the module's output is replace(output) (first element, for tuple outputs)."""

    def hook(_module: nn.Module, _inputs: tuple[Any, ...], output: Any) -> Tensor | tuple[Any, ...]:
        if isinstance(output, tuple):
            return (replace(output[0]), *output[1:])
        return replace(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


BATCH_TOKENS = 16_384  # padded tokens in one batch of `outputs_at`: 16 sequences of 1,024, so long ones bound memory


def bos_token_id(tokenizer: Any) -> int:
    """The token every sequence starts with: BOS, or EOS where the tokenizer has no BOS (as GPT-2's, whose BOS is its
    EOS); TransformerLens prepends it too."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise DataError("the tokenizer has neither a BOS nor an EOS token")
    return int(bos)


def context_length(model: nn.Module) -> int | None:
    """The model's positions (max_position_embeddings, GPT-2's n_positions), None where its config names none."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


@torch.no_grad()
def outputs_at(
    model: nn.Module,
    module: nn.Module,
    ids: Sequence[Sequence[int]],
    positions: Sequence[int],
    batch_size: int,
    done: Callable[[int], Any] | None = None,
) -> Tensor:
    """The module's output [len(ids), d] at positions[i] of sequence ids[i], float32 on the CPU. Sequences of like
    length are batched (`length_batches`) and padded on the right, which causal attention keeps from every real
    token, so no attention mask is needed. done(n): called after each batch of n sequences (a progress bar)."""
    device = next(model.parameters()).device
    out: Tensor | None = None
    for rows in length_batches(ids, batch_size):
        lengths = [len(ids[i]) for i in rows]
        batch = torch.zeros(len(rows), max(lengths), dtype=torch.long)  # the pad id is never read
        for j, i in enumerate(rows):
            batch[j, : lengths[j]] = torch.tensor(ids[i])
        acts = capture(model, module, batch.to(device))
        where = torch.tensor([positions[i] for i in rows], device=acts.device)
        picked = acts[torch.arange(len(rows), device=acts.device), where].float().cpu()
        if out is None:
            out = picked.new_empty(len(ids), picked.shape[1])
        out[rows] = picked
        if done is not None:
            done(len(rows))
    return out if out is not None else torch.zeros(0, 0)


def length_batches(ids: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    """Row indices of batches of like length (little padding), shortest first, each of at most batch_size rows and
    BATCH_TOKENS padded tokens (or one row), so that long sequences come a few at a time."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) == batch_size or (len(batch) + 1) * len(ids[i]) > BATCH_TOKENS):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch
