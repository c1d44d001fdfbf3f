"""The language model side: a Hugging Face causal LM, the hooked module, and its output read or replaced.

- `load_model`: any `transformers` causal LM by hub name or local path (a folder saved with
  `save_pretrained`, or a `.gguf` file), in eval mode.
- `resolve_hook`: an HF module path (`transformer.h.0.mlp`) or a TransformerLens-style alias
  (`blocks.0.hook_mlp_out`, `hook_attn_out`, `hook_resid_post`) for GPT-2 and Llama-style models.
- `capture`: the hooked module's output, read with a forward hook that stops the forward right there,
  so extracting layer 0 costs one layer, not the whole model (the embeddings, token and position,
  run as in the real model).
- `splice`: within a block, the hooked module's output replaced by a function of it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
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
