"""Behaviour pinned across refactors: two small runs must end with the weights they had when the fingerprints
in tests/data/pinned_weights.json were made. A deliberate change of behaviour regenerates them with
`MFR_SAE_REPIN=1 python -m pytest tests/test_pinned_weights.py` (say why in the commit)."""

import json
import os
from pathlib import Path

import pytest
import torch

from mfr_sae.config import load_config
from mfr_sae.train import train

PINS = Path(__file__).parent / "data" / "pinned_weights.json"
BASE = [
    "data.d=32",
    "data.n_features=64",
    "data.n_groups=4",
    "data.n_active=3",
    "sae.d_sae=128",
    "train.n_samples=30000",
    "train.batch_size=500",
    "train.lr=3e-3",
    "eval.n_samples=2000",
    "train.checkpoint_every=0",
    "mfr.enabled=true",
    "mfr.warmup_steps=10",
    "mfr.reinit_window=20",
    "mfr.reinit_threshold=0.3",
    "mfr.reinit_max=2",
    "mfr.reinit_samples=2000",
]
RUNS = {  # the defaults before 2026-12-03 (hungarian, beta 0.1*auto, matched every 10 steps) and the paper's form
    "tied_hungarian": [
        "sae.n_members=3",
        "sae.k=[3,4,3]",
        "mfr.mmcs=hungarian",
        "mfr.beta=0.1*auto",
        "mfr.match_every=10",
        "mfr.idle_window=0",
        "mfr.max_cosine=1",
        "mfr.twin_guard=1",
        "mfr.confirm_cosine=1",
    ],
    "untied_max_bias": [
        "sae.n_members=2",
        "sae.k=3",
        "sae.tied=false",
        "sae.decoder_bias=true",
        "mfr.mmcs=max",
        "mfr.beta=auto",
        "mfr.match_every=1",
        "mfr.idle_window=0",
        "mfr.max_cosine=1",
        "mfr.twin_guard=1",
        "mfr.confirm_cosine=1",
    ],
}


def fingerprint(run_dir: Path) -> dict[str, list[float]]:
    """Per weight tensor: sum, sum of squares and a fixed random projection (float64), which any change of
    behaviour moves far more than rounding does."""
    from mfr_sae import load

    out = {}
    for name, p in load(run_dir).named_parameters():
        flat = p.detach().double().flatten()
        probe = torch.randn(len(flat), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        out[name] = [flat.sum().item(), (flat * flat).sum().item(), (flat @ probe).item()]
    return out


@pytest.mark.parametrize("name", RUNS)
def test_a_small_run_ends_with_its_pinned_weights(tmp_path, name):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order, whatever the machine's cores
    try:
        results = train(load_config(None, BASE + RUNS[name]), tmp_path / name, progress=False)
    finally:
        torch.set_num_threads(threads)
    got = fingerprint(tmp_path / name)
    got["reinit_events"] = [float(len(results["reinit_events"]))]
    pins = json.loads(PINS.read_text()) if PINS.exists() else {}
    if os.environ.get("MFR_SAE_REPIN"):
        pins[name] = got
        PINS.write_text(json.dumps(pins, indent=1) + "\n")
    assert name in pins, f"no fingerprint for {name}: make one with MFR_SAE_REPIN=1"
    assert got.keys() == pins[name].keys()
    for key, values in pins[name].items():
        assert got[key] == pytest.approx(values, rel=1e-6, abs=1e-9), key
