"""Reproductions of the paper's experiments: `mfr-sae reproduce NAME`."""

from __future__ import annotations

import itertools
import json
import platform
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mfr_sae.checkpoint import load  # noqa: E402
from mfr_sae.config import ConfigError, RunConfig, load_config  # noqa: E402
from mfr_sae.report import save_figure  # noqa: E402
from mfr_sae.train import CONFIG_FILE, RESULTS_FILE, resume, train  # noqa: E402


def train_or_reuse(cfg: RunConfig, run_dir: Path, progress: bool) -> dict[str, Any]:
    """A finished run's results, an interrupted run resumed, or a new run: reproductions can restart. A run
    folder whose saved config is not `cfg` is an error naming the first field that differs (never mixed)."""
    if (run_dir / CONFIG_FILE).is_file():
        differs = config_difference(load_config(run_dir / CONFIG_FILE), cfg)
        if differs:
            raise ConfigError(f"{run_dir} holds a run of another setting ({differs}): choose another --out")
    if (run_dir / RESULTS_FILE).is_file():
        return json.loads((run_dir / RESULTS_FILE).read_text())
    if run_dir.exists():
        return resume(run_dir, progress=progress)
    return train(cfg, run_dir, progress=progress)


def config_difference(saved: RunConfig, wanted: RunConfig) -> str | None:
    """`section.field: saved != wanted` for the first field that differs, None when none does (data.d of a
    source that reads it from its data is the data's, so it is not compared)."""
    a, b = saved.to_dict(), wanted.to_dict()
    for section, fields in b.items():
        for name, value in fields.items():
            if section == "data" and name == "d" and wanted.data.kind != "synthetic":
                continue
            if a[section][name] != value:
                return f"{section}.{name}: {a[section][name]!r} there, {value!r} here"
    return None


def machine() -> str:
    return (torch.cuda.get_device_name() if torch.cuda.is_available()
            else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")


def relative(a: float, b: float) -> str:
    return f"{100 * (a - b) / b:+.2f}%"


def decoder_distances(run_dir: Path) -> list[float]:
    """Paper Section 4.3: for each member, the mean L2 (Frobenius) distance of its decoder matrix to
    the other members' decoders (raw, without aligning latents, as in the paper)."""
    decoder = load(run_dir).decoder().detach()
    n = len(decoder)
    dist = torch.zeros(n, n)
    for a, b in itertools.combinations(range(n), 2):
        dist[a, b] = dist[b, a] = (decoder[a] - decoder[b]).norm()
    return (dist.sum(1) / (n - 1)).tolist()


def figure_distances(dist: dict[str, list[float]], ks: list[int], path: Path) -> None:
    """Bars of decoder_distances per member (one k each), baseline beside MFR."""
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(ks))
    for offset, (name, values) in zip((-0.2, 0.2), dist.items()):
        ax.bar(x + offset, values, width=0.4, label=name)
    ax.set_xticks(x, [f"k={k}" for k in ks])
    ax.set_ylabel("mean L2 distance to the other members' decoders")
    ax.set_title("Decoder distances between members (paper Section 4.3)", fontsize=10)
    ax.legend()
    save_figure(fig, path)
