"""Language-model activations on disk: text, token sequences, and the activation cache.

The model side (loading, the hook, capturing) is in `mfr_sae.data.lm_model`.

- Text: documents from a `.txt` file (one per non-empty line), a `.jsonl` file (field `text`), a folder
  of those, or a Hugging Face dataset name (streamed; needs `datasets`). BOS handling: documents are
  tokenised, joined with EOS, cut into sequences of `context - 1` tokens and each gets BOS in front;
  the BOS position is left out of the cache (its activations are outliers) and left clean when
  splicing, so the SAE is trained and scored on the same positions.
- The cache: `shard_*.npy` arrays of [rows, d] plus `manifest.json` (model, revision, hook, dtype,
  context length, token count, a SHA-256 per shard). Built in a folder beside, named by this process
  (`<out>.mfr-sae-building-<pid>-<random>`), and renamed into place; a matching cache is reused; a
  mismatched or corrupt one is a clear error, and so is a folder that is neither empty nor a cache.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mfr_sae.data.lm_model import bos_token_id, capture, context_length, load_model, resolve_hook
from mfr_sae.data.vectors import DataError, VectorsData
from mfr_sae.extras import require
from mfr_sae.files import sha256

MANIFEST = "manifest.json"


# ---------------------------------------------------------------- text


def is_local_text(source: str) -> bool:
    """Whether read_texts takes `source` as a local file or folder (else: a Hugging Face dataset name)."""
    path = Path(source)
    return path.is_dir() or path.suffix in (".txt", ".jsonl")


def read_texts(source: str) -> Iterator[str]:
    """Documents from a .txt file (one per non-empty line), a .jsonl file (`text`), a folder of those,
    or a Hugging Face dataset name (streamed)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl"))
        if not files:
            raise DataError(f"{path}: no .txt or .jsonl files in this folder")
        for file in files:
            yield from read_texts(str(file))
    elif path.suffix == ".txt" and path.is_file():
        with open(path, encoding="utf-8") as f:
            yield from (line.strip() for line in f if line.strip())
    elif path.suffix == ".jsonl" and path.is_file():
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise DataError(f"{path}: line {number} is not a JSON object with a 'text' field") from None
    elif path.suffix in (".txt", ".jsonl"):
        raise DataError(f"text file not found: {path}")
    else:
        yield from _hub_texts(source)


def _hub_texts(name: str) -> Iterator[str]:
    datasets = _require_datasets(name)
    try:  # streaming needs the hub; a copy in the local Hugging Face cache serves without it
        rows = datasets.load_dataset(name, split="train", streaming=True)
        first = next(iter(rows))
    except Exception:
        try:
            rows = datasets.load_dataset(name, split="train")
            first = None
        except Exception as err:
            raise DataError(
                f"cannot read dataset {name!r} from the hub or the local cache "
                f"({str(err).splitlines()[0][:160]}); pass a local .txt or .jsonl file"
            ) from None
    if first is not None:
        yield first["text"]
        rows = rows.skip(1)
    for row in rows:
        yield row["text"]


def _require_datasets(name: str) -> ModuleType:
    return require(
        "datasets", f"text {name!r} is not a local .txt/.jsonl file or folder, and reading it as a Hugging Face dataset"
    )


def token_sequences(texts: Iterator[str], tokenizer: Any, context: int) -> Iterator[Tensor]:
    """Sequences of `context` token ids: BOS followed by `context - 1` tokens of the joined documents."""
    bos = bos_token_id(tokenizer)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    buffer: list[int] = []
    for text in texts:
        buffer += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        while len(buffer) >= context - 1:
            yield torch.tensor([bos] + buffer[: context - 1])
            buffer = buffer[context - 1 :]


def batched(sequences: Iterator[Tensor], batch_size: int) -> Iterator[Tensor]:
    batch = []
    for seq in sequences:
        batch.append(seq)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


# ---------------------------------------------------------------- the cache


def cache_key(model: str, hook: str, text: str, context: int, n_tokens: int, dtype: str) -> dict[str, Any]:
    return {"model": model, "hook": hook, "text": text, "context": context, "n_tokens": n_tokens, "dtype": dtype}


def build_cache(
    model_name: str,
    hook: str,
    text: str,
    out: str | Path,
    n_tokens: int,
    context: int = 128,
    batch_size: int = 8,
    dtype: str = "float32",
    shard_tokens: int = 1_000_000,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Path:
    """Write n_tokens activation vectors of `hook` to `out` (reusing a matching cache there). `out` must
    be absent, an empty folder, or a cache; the cache is built in a folder beside it that this process
    names and creates, and that is removed if the build fails."""
    out = Path(out)
    key = cache_key(model_name, hook, text, context, n_tokens, dtype)
    if (out / MANIFEST).is_file():
        try:
            manifest = json.loads((out / MANIFEST).read_text())
        except json.JSONDecodeError:
            raise DataError(f"{out / MANIFEST}: corrupt manifest; choose another folder") from None
        if all(manifest.get(k) == v for k, v in key.items()):
            return out
        differ = ", ".join(f"{k}: {manifest.get(k)!r} vs {v!r}" for k, v in key.items() if manifest.get(k) != v)
        raise DataError(f"{out} holds a different cache ({differ}); choose another folder")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: a file, not a folder; choose another path for the cache")
    if out.is_dir() and any(out.iterdir()):
        raise DataError(
            f"{out}: this folder is not empty and is not an activation cache (no {MANIFEST}); "
            f"choose an empty or new folder"
        )
    if dtype not in ("float32", "float16"):
        raise DataError(f"cache dtype {dtype!r}: must be float32 or float16")
    if not is_local_text(text):
        _require_datasets(text)
    model, tokenizer = load_model(model_name, device)
    module_path, module = resolve_hook(model, hook)
    limit = context_length(model)
    if limit is not None and context > limit:
        raise DataError(f"context {context} is longer than the model's {limit} positions")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.mfr-sae-building-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()  # fails if the name is taken: the folder removed below is always this process's own
    try:
        shards, width = _write_shards(
            model, module, tokenizer, text, tmp, n_tokens, context, batch_size, dtype, shard_tokens, device, progress
        )
        for entry in shards:
            entry["sha256"] = sha256(tmp / entry["file"])
        manifest = {
            **key,
            "module": module_path,
            "revision": getattr(model.config, "_commit_hash", None) or "local",
            "d": int(width),
            "bos": "each sequence starts with BOS; the BOS position is not cached",
            "shards": shards,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.is_dir():
            try:
                out.rmdir()  # empty (checked above); refuses if something appeared in it since
            except OSError:
                raise DataError(
                    f"{out}: files appeared in this folder while the cache was built; "
                    f"left as it is, choose an empty or new folder"
                ) from None
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_shards(
    model: nn.Module,
    module: nn.Module,
    tokenizer: Any,
    text: str,
    tmp: Path,
    n_tokens: int,
    context: int,
    batch_size: int,
    dtype: str,
    shard_tokens: int,
    device: str | torch.device,
    progress: bool,
) -> tuple[list[dict[str, Any]], int]:
    """Write the shards of n_tokens vectors into tmp; returns their manifest entries and d."""
    shards: list[dict[str, Any]] = []
    shard, filled, written, width = None, 0, 0, 0
    with tqdm(total=n_tokens, desc="cache", unit="tok", disable=not progress) as bar:
        for ids in batched(token_sequences(read_texts(text), tokenizer, context), batch_size):
            captured = capture(model, module, ids.to(device))[:, 1:]  # drop the BOS position
            width = captured.shape[-1]
            acts = captured.reshape(-1, width).float().cpu().numpy()
            del captured  # (freed here, before the next batch is captured)
            while len(acts) and written < n_tokens:
                if shard is None:
                    rows = min(shard_tokens, n_tokens - written)
                    name = f"shard_{len(shards):05d}.npy"
                    shard = np.lib.format.open_memmap(tmp / name, mode="w+", dtype=dtype, shape=(rows, acts.shape[1]))
                    shards.append({"file": name, "rows": rows})
                    filled = 0
                take = min(len(acts), len(shard) - filled)
                shard[filled : filled + take] = acts[:take]
                acts, filled, written = acts[take:], filled + take, written + take
                bar.update(take)
                if filled == len(shard):
                    shard.flush()
                    shard = None
            if written >= n_tokens:
                break
    if written < n_tokens:
        raise DataError(f"text {text!r} gave {written} tokens, fewer than the {n_tokens} asked for")
    return shards, width


def read_manifest(cache: str | Path, verify: bool = True) -> dict[str, Any]:
    """The cache's manifest, after checking that every shard exists (and its SHA-256, when verify)."""
    cache = Path(cache)
    if not (cache / MANIFEST).is_file():
        raise DataError(f"{cache}: not an activation cache (no {MANIFEST}); build one with `mfr-sae cache`")
    try:
        manifest: dict[str, Any] = json.loads((cache / MANIFEST).read_text())
        shards = manifest["shards"]
    except (json.JSONDecodeError, KeyError):
        raise DataError(f"{cache / MANIFEST}: corrupt manifest") from None
    for entry in shards:
        path = cache / entry["file"]
        if not path.is_file():
            raise DataError(f"{path}: shard missing from the cache")
        if verify and sha256(path) != entry["sha256"]:
            raise DataError(f"{path}: checksum mismatch, the shard is corrupt; rebuild the cache")
    return manifest


class ActivationCache(VectorsData):
    """Training vectors from a cache built by `build_cache` (checked against its manifest)."""

    def __init__(
        self,
        cache: str | Path,
        seed: int = 0,
        holdout: int = 10_000,
        shuffle_buffer: int = 131_072,
        verify: bool = True,
    ):
        self.manifest = read_manifest(cache, verify)
        super().__init__(cache, seed, holdout, shuffle_buffer)
