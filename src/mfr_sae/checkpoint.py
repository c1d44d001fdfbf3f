"""Checkpoints in the SAELens layout, written atomically, loaded without pickle.

A run folder:
    config.yaml        the resolved run config
    metrics.jsonl      one JSON line per logged step / evaluation
    results.json       final evaluation, one entry per member
    checkpoint/        replaced as a whole at every save (written beside, then renamed into place)
        member_<i>/cfg.json, sae_weights.safetensors    one SAELens-loadable TopK SAE per member
        trainer_state.safetensors                       optimiser and counters, for --resume
        digests.json                                    the SHA-256 of every other file, written last

Every reader checks the SHA-256 of the files it reads against digests.json (digests.py; a checkpoint without one,
written before digests were recorded, loads unchecked); `digests.verify_checkpoint` checks them all. The trainer
state is read back by trainer_state.py.

Member weights use SAELens names and shapes: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in]
(unit-norm rows), b_dec [d_in].
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from mfr_sae.digests import check_digest, record_digests, recorded_digests
from mfr_sae.ensemble import Ensemble
from mfr_sae.errors import CheckpointError
from mfr_sae.files import fsync_dir, fsync_file, read_json, write_json

CHECKPOINT_DIR = "checkpoint"
WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
SPARSITY_FILE = "sparsity.safetensors"  # SAELens' name: log10 of each latent's firing probability
STATE_FILE = "trainer_state.safetensors"
SAELENS_FORMAT = "6.0.0"  # the cfg.json layout SAELens 6.x reads (checked with sae-lens 6.54.12)


def member_cfg(ensemble: Ensemble, i: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """cfg.json of member i: SAELens's fields of its saved architecture (TopK; JumpReLU for BatchTopK) plus this
    library's own under `mfr_sae`."""
    return {
        "architecture": ensemble.architecture.saved_as,
        "d_in": ensemble.d_in,
        "d_sae": ensemble.d_sae,
        **ensemble.architecture.saelens_fields(ensemble, i),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": ensemble.b_dec is not None,  # (b_dec is saved as zeros without one)
        "normalize_activations": "none",
        "reshape_activations": "none",
        # SAELens reads the nested metadata only when it names a format version >= 6.0.0.
        "metadata": {"sae_lens_version": SAELENS_FORMAT, **dict(extra or {}).get("metadata", {})},
        "mfr_sae": {
            "architecture": ensemble.architecture.name,
            **ensemble.architecture.options(),
            "k": ensemble.ks[i],
            "member": ensemble.member_ids[i],
            "tied": ensemble.tied,
            "decoder_bias": ensemble.b_dec is not None,
            "seed": ensemble.seed,
            **{k: v for k, v in (extra or {}).items() if k != "metadata"},
        },
    }


def member_tensors(ensemble: Ensemble, i: int) -> dict[str, Tensor]:
    """Member i's weights under SAELens names and shapes, on the CPU, contiguous."""
    with torch.no_grad():
        b_dec = ensemble.b_dec[i] if ensemble.b_dec is not None else torch.zeros(ensemble.d_in)
        tensors = {
            "W_enc": ensemble.W_enc[i].T,
            "b_enc": ensemble.b_enc[i],
            "W_dec": ensemble.decoder()[i],
            "b_dec": b_dec,
            **ensemble.architecture.saved_tensors(ensemble, i),
        }
        return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}


def save_member(
    folder: Path, ensemble: Ensemble, i: int, extra: dict[str, Any] | None = None, firing_prob: Tensor | None = None
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(member_tensors(ensemble, i), folder / WEIGHTS_FILE)
    fsync_file(folder / WEIGHTS_FILE)
    if firing_prob is not None:
        sparsity = firing_prob.detach().float().cpu().clamp_min(1e-10).log10().contiguous()
        save_file({"sparsity": sparsity}, folder / SPARSITY_FILE)
        fsync_file(folder / SPARSITY_FILE)
    write_json(folder / CFG_FILE, member_cfg(ensemble, i, extra))  # also fsyncs the folder's entries


def save_checkpoint(
    run_dir: Path,
    ensemble: Ensemble,
    state: dict[str, Tensor] | None = None,
    state_meta: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    firing_prob: Tensor | None = None,
) -> Path:
    """Write run_dir/checkpoint atomically: build it beside, then rename it into place. `firing_prob`
    [N, h] (from the last evaluation) is saved per member as SAELens' sparsity.safetensors. A failed write
    (a full disk...) removes what it wrote and leaves the previous checkpoint as it was."""
    run_dir = Path(run_dir)
    final = run_dir / CHECKPOINT_DIR
    tmp = run_dir / f"{CHECKPOINT_DIR}.tmp"
    old = run_dir / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for i, member_id in enumerate(ensemble.member_ids):
            save_member(
                tmp / f"member_{member_id}", ensemble, i, extra, None if firing_prob is None else firing_prob[i]
            )
        if state is not None:
            tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            save_file(tensors, tmp / STATE_FILE, metadata={"meta": json.dumps(state_meta or {})})
            fsync_file(tmp / STATE_FILE)
        record_digests(tmp)
        fsync_dir(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)  # the one step that makes the new checkpoint current
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint must not fill the disk or block the next
        # safetensors writes tensors built here (contiguous, on the CPU): its errors are those of the disk
        if isinstance(err, OSError | SafetensorError):
            raise CheckpointError(_write_failure(run_dir, tmp, err)) from None
        raise
    fsync_dir(run_dir)  # ... and this makes it survive a power cut
    shutil.rmtree(old, ignore_errors=True)
    return final


def _write_failure(run_dir: Path, tmp: Path, err: BaseException) -> str:
    """The one line for a checkpoint that could not be written: where, why, and what to do."""
    why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    filename = getattr(err, "filename", None)
    previous = checkpoint_dir(run_dir)
    kept = f"the previous checkpoint {previous} is untouched" if previous else "there is no earlier checkpoint"
    then = f"`mfr-sae train --resume {run_dir}`" if previous else "the same command again"
    return (
        f"cannot write the checkpoint {tmp} ({why}{f': {filename}' if filename else ''}); it was removed and "
        f"{kept}: free space on that disk (or make it writable), then run {then}"
    )


def checkpoint_dir(run_dir: Path) -> Path | None:
    """The current checkpoint of a run, or the previous one if a save was cut off mid-swap."""
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):
        if (Path(run_dir) / name).is_dir():
            return Path(run_dir) / name
    return None


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"corrupt checkpoint file {path}: {err}") from None


def _member_id(folder: Path) -> int:
    return int(folder.name.split("_", 1)[1])


def _member_folders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.startswith("member_")), key=_member_id)


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder of a run folder, or the folder itself when it holds member_<i>/ folders."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no SAE or run found at {path}")
    ckpt = path if path.is_dir() and _member_folders(path) else checkpoint_dir(path)
    if ckpt is None or not _member_folders(ckpt):
        raise CheckpointError(f"{path} holds no member_*/ folders and no {CHECKPOINT_DIR}/ folder")
    return ckpt


def load(path: str | Path, device: str | torch.device = "cpu", members: list[int] | None = None) -> Ensemble:
    """Load one member folder (cfg.json + sae_weights.safetensors), a checkpoint folder, or a run
    folder, as an Ensemble (of one member for a member folder); `members`: only these (by member id).
    Each member's files are first checked against the SHA-256 recorded beside them, when there is one."""
    path = Path(path)
    if (path / CFG_FILE).is_file():
        folders = [path]
    else:
        ckpt = find_checkpoint(path)
        folders = [f for f in _member_folders(ckpt) if members is None or _member_id(f) in members]
        if members is not None and len(folders) != len(members):
            raise CheckpointError(f"{ckpt} holds no member_<i>/ folder for some of members {members}")
    digests = recorded_digests(folders[0].parent)  # a member folder's checkpoint folder
    for folder in folders:
        for name in (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE):
            check_digest(folder.parent, f"{folder.name}/{name}", digests)
    cfgs = [read_json(f / CFG_FILE) for f in folders]
    tensors = [_load_safetensors(f / WEIGHTS_FILE) for f in folders]
    try:
        own = [c["mfr_sae"] for c in cfgs]
        ensemble = Ensemble(
            cfgs[0]["d_in"],
            cfgs[0]["d_sae"],
            [o.get("k", c.get("k")) for o, c in zip(own, cfgs)],  # (k at the top only, before architectures)
            tied=own[0]["tied"],
            decoder_bias=own[0]["decoder_bias"],
            seed=own[0]["seed"],
            member_ids=[o["member"] for o in own],
            architecture=own[0].get("architecture", "topk"),
            architecture_options=own[0],  # (its own options are among them, by config key)
        )
    except KeyError as err:
        raise CheckpointError(f"{folders[0] / CFG_FILE}: missing key {err}") from None
    except ValueError as err:  # an architecture this version does not know
        raise CheckpointError(f"{folders[0] / CFG_FILE}: {err}") from None
    _fill(ensemble, tensors, folders)
    return ensemble.to(device).eval()  # members as saved (BatchTopK: JumpReLU); .train() to train them on


@torch.no_grad()
def _fill(ensemble: Ensemble, tensors: list[dict[str, Tensor]], folders: list[Path]) -> None:
    d, h = ensemble.d_in, ensemble.d_sae
    for i, (weights, folder) in enumerate(zip(tensors, folders)):
        expected = {"W_enc": (d, h), "b_enc": (h,), "W_dec": (h, d), "b_dec": (d,)}
        expected |= {name: tuple(t.shape) for name, t in ensemble.architecture.saved_tensors(ensemble, i).items()}
        for name, shape in expected.items():
            if name not in weights:
                raise CheckpointError(f"{folder / WEIGHTS_FILE}: missing tensor {name}")
            if tuple(weights[name].shape) != shape:
                raise CheckpointError(
                    f"{folder / WEIGHTS_FILE}: {name} has shape {list(weights[name].shape)}, "
                    f"{CFG_FILE} says {list(shape)} (d_in={d}, d_sae={h})"
                )
            if not weights[name].is_floating_point():
                raise CheckpointError(
                    f"{folder / WEIGHTS_FILE}: {name} has dtype {weights[name].dtype}, not a floating-point type"
                )
            finite = torch.isfinite(weights[name])
            if not finite.all():
                what = "NaN" if weights[name].isnan().any() else "inf"
                raise CheckpointError(
                    f"{folder / WEIGHTS_FILE}: {name} holds {what} ({int((~finite).sum())} of {finite.numel()} values)"
                )
        ensemble.W_enc[i].copy_(weights["W_enc"].T)
        ensemble.b_enc[i].copy_(weights["b_enc"])
        if ensemble.W_dec is not None:
            ensemble.W_dec[i].copy_(weights["W_dec"])
        if ensemble.b_dec is not None:
            ensemble.b_dec[i].copy_(weights["b_dec"])
        ensemble.architecture.load_tensors(ensemble, i, weights)
