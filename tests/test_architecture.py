"""A new architecture is one module and its tests: this file adds one (a TopK whose training form drops kept
pre-activations below an option of its own, `sae.floored_floor`) with no edit under src/, and trains, checks,
saves, resumes and loads it, in this library and in SAELens."""

import json
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from mfr_sae import load
from mfr_sae.architecture import ARCHITECTURES, Members
from mfr_sae.config import ConfigError, help_text, load_config
from mfr_sae.kernels import Selector, topk_selector
from mfr_sae.topk import TopK
from mfr_sae.train import train


class Floored(TopK):
    """TopK whose training form keeps only the kept pre-activations at or above `floor`."""

    name = "floored"

    @dataclass
    class Options:
        floor: float = 0.0
        """the smallest pre-activation kept in training."""

    def __init__(self, d_sae: int, options=None):
        super().__init__(d_sae, options)
        if self.opts.floor < 0:
            raise ValueError(f"sae.floored_floor={self.opts.floor}: must be >= 0")

    def selector(self, ensemble: Members) -> tuple[Selector, Tensor | None]:
        topk = topk_selector(ensemble.k_max)
        if not ensemble.training:
            return topk, None

        def select(pre: Tensor) -> tuple[Tensor, Tensor]:
            values, idx = topk(pre)
            return values * (values >= self.opts.floor), idx

        return select, None


@pytest.fixture
def floored(monkeypatch):
    """Register the toy architecture for one test (registering is all a new module does)."""
    monkeypatch.setitem(ARCHITECTURES, Floored.name, Floored)


def test_a_new_architecture_with_an_option_is_checked_trained_saved_resumed_and_loaded(
    tmp_path, easy_overrides, floored, cut_and_resumed
):
    overrides = [*easy_overrides, "sae.architecture=floored", "sae.floored_floor=0.5", "train.n_samples=30000"]
    overrides += ["train.checkpoint_every=10", "mfr.enabled=true"]
    assert "sae.floored_floor (float, default 0.0)" in help_text()
    with pytest.raises(ConfigError, match=r"sae.floored_floor=-1.0: must be >= 0"):
        load_config(None, [*overrides, "sae.floored_floor=-1"])
    with pytest.raises(ConfigError, match="sae.floored_floor is set but sae.architecture='topk'"):
        load_config(None, [*easy_overrides, "sae.floored_floor=0.1"])

    full = train(load_config(None, overrides), tmp_path / "full", progress=False)
    _, resumed = cut_and_resumed(overrides, tmp_path / "cut", 17)
    assert resumed["members"] == full["members"]
    cfg = json.loads((tmp_path / "full" / "checkpoint" / "member_0" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["mfr_sae"]["floored_floor"] == 0.5
    loaded = load(tmp_path / "full")
    assert isinstance(loaded.architecture, Floored) and loaded.architecture.opts.floor == 0.5
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, load(tmp_path / "cut").state_dict()[name]), name

    # the option acts in training: without it the same run trains other weights
    other = train(load_config(None, [*overrides, "sae.floored_floor=0"]), tmp_path / "zero", progress=False)
    assert other["members"] != full["members"]

    sae_lens = pytest.importorskip("sae_lens")
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "full" / "checkpoint" / "member_1"), device="cpu")
    x = torch.randn(7, loaded.d_in)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), loaded(x).x_hat[1], atol=1e-5, rtol=1e-5)


def test_an_unknown_option_is_a_one_line_error_and_every_option_is_written(floored):
    with pytest.raises(ValueError, match=r"sae.floored_nope: floored has no option 'nope'"):
        Floored(8, {"floored_nope": 1})
    cfg = load_config(None, [])
    cfg.sae.options["nobody_x"] = 1  # filled in code, past set_field's check
    with pytest.raises(ConfigError, match="sae.nobody_x: no architecture has this option"):
        cfg.validate()
    # every registered option is written, set or not, so that two saved configs compare key by key
    written = load_config(None, []).to_dict()["sae"]
    assert written["matryoshka_widths"] == [] and written["floored_floor"] == 0.0 and "options" not in written
