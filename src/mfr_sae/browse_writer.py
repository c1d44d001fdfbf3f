"""`mfr-sae browse RUN --out DIR`: a static site of a run on language-model activations (docs/language-models.md),
from what browse.py collects of its latents. A latent is shared when its best cosine is at least SHARED_COSINE in
every other member. The site (browse_site/) reads its data from JavaScript files, so that it opens from the file
system as well as from a web server.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from mfr_sae.browse import (
    AFTER,
    BEFORE,
    CONTEXTS,
    LatentStats,
    agreement,
    best_matches,
    collect,
    logit_effects,
    sequences_of,
    token_position,
    window_activations,
)
from mfr_sae.checkpoint import load
from mfr_sae.config import load_run_config
from mfr_sae.data import DataError
from mfr_sae.data.activations import ActivationCache
from mfr_sae.data.lm_model import load_model
from mfr_sae.search import Top

SHARED_COSINE = 0.9  # a latent matched at least this close in every other member is shared by all
LATENTS_PER_FILE = 256  # latents whose details one data file holds (loaded when one of them is opened)


def browse(
    run: Path,
    out: Path,
    baseline: Path | None = None,
    contexts: int = CONTEXTS,
    max_rows: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the site of `run` (trained on an activation cache) in `out`; `baseline`: a run to compare the share
    of shared latents with; max_rows: read only the cache's first rows. Returns the summary it shows."""
    cfg = load_run_config(run / "config.yaml")
    if cfg.data.kind != "activations":
        raise DataError(f"{run}: trained on data.kind={cfg.data.kind}; browse reads runs on an activation cache")
    cache = ActivationCache(_cache_path(run, str(cfg.data.path)), holdout=cfg.data.holdout, verify=False)
    manifest, context = cache.manifest, cache.manifest["context"]
    n_rows = cache.n_train + cache.holdout
    n_rows = n_rows if max_rows is None else min(max_rows, n_rows)
    ensemble = load(run)
    stats = collect(ensemble, cache, n_rows, contexts, progress=progress)
    windows = window_activations(ensemble, cache, stats, context)
    model, tokenizer = load_model(manifest["model"])
    decoder = ensemble.decoder().detach()
    n, h, d = decoder.shape
    promoted, suppressed = logit_effects(model, decoder.reshape(n * h, d))
    cosine, match = best_matches(decoder)
    agreed = agreement(cosine)
    fired_rows = stats.top.indices[stats.top.values > 0]
    count = int(token_position(fired_rows, context)[0].max()) + 1 if len(fired_rows) else 0
    sequences = sequences_of(manifest, tokenizer, count)
    summary = {
        "run": str(run),
        "rows": n_rows,
        "shared_cosine": SHARED_COSINE,
        "members": [
            {"id": int(i), "k": k, "shared": _share(agreed[m])}
            for m, (i, k) in enumerate(zip(ensemble.member_ids, ensemble.ks))
        ],
    }
    baseline_agreed = agreement(best_matches(load(baseline).decoder().detach())[0]) if baseline else None
    if baseline_agreed is not None:
        summary["baseline"] = {"run": str(baseline), "shared": [_share(a) for a in baseline_agreed]}
    site = Site(out, tokenizer, context, sequences)
    site.write(summary, stats, windows, (promoted, suppressed), cosine, match)
    _agreement_figure(out / "summary.png", agreed, baseline_agreed)
    return summary


def _share(agreed: Tensor) -> float:
    return round(float((agreed >= SHARED_COSINE).float().mean()), 4)


def _cache_path(run: Path, path: str) -> Path:
    """The run's cache: data.path as given, or (a relative one) from the run folder or the folder it was run from
    (`reproduce gpt2` writes OUT/cache beside OUT/runs/NAME)."""
    given = Path(path)
    for candidate in (
        given,
        run / given,
        run.parent / given,
        run.parent.parent / given,
        run.parent.parent / given.name,
    ):
        if (candidate / "manifest.json").is_file():
            return candidate
    raise DataError(f"{run}: its activation cache {path} is not there (nor beside the run)")


def _agreement_figure(path: Path, agreed: Tensor, baseline: Tensor | None) -> None:
    """The distribution of latents' agreement (lowest best-match cosine over the other members), run and baseline."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    bins = np.linspace(0, 1, 41).tolist()
    for values, label in ((agreed, "this run"), (baseline, "baseline")):
        if values is not None:
            ax.hist(values.flatten().numpy(), bins=bins, histtype="step", linewidth=1.5, label=label, density=True)
    ax.axvline(SHARED_COSINE, color="grey", linestyle=":", label=f"shared ({SHARED_COSINE})")
    ax.set_xlabel("latent's lowest best-match cosine over the other members")
    ax.set_ylabel("density")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Site:
    """Writes the static site: browse_site/'s page, script and style, and the data as JavaScript files (a page
    opened from the file system may run scripts but not fetch files)."""

    def __init__(self, out: Path, tokenizer: Any, context: int, sequences: np.ndarray):
        self.out, self.tokenizer, self.context, self.sequences = out, tokenizer, context, sequences
        self.token_ids: set[int] = set()

    def write(
        self,
        summary: dict[str, Any],
        stats: LatentStats,
        windows: Tensor,
        logits: tuple[Top, Top],
        cosine: Tensor,
        match: Tensor,
    ) -> None:
        (self.out / "data" / "latents").mkdir(parents=True, exist_ok=True)
        for name in ("index.html", "app.js", "style.css"):
            with resources.as_file(resources.files("mfr_sae") / "browse_site" / name) as source:
                shutil.copyfile(source, self.out / name)
        n, h = stats.fired.shape
        for m in range(n):
            details = [self._latent(stats, windows, logits, m * h + i) for i in range(h)]
            for start in range(0, h, LATENTS_PER_FILE):
                self._script(
                    f"latents/m{m}_{start // LATENTS_PER_FILE}",
                    f"MFR.details['m{m}_{start // LATENTS_PER_FILE}']",
                    details[start : start + LATENTS_PER_FILE],
                )
            self._script(f"member{m}", f"MFR.members[{m}]", self._member(stats, m, cosine, match, details))
        self._script("run", "MFR.run", summary | {"latents_per_file": LATENTS_PER_FILE})
        self._script("tokens", "MFR.tokens", {i: self.tokenizer.decode([i]) for i in sorted(self.token_ids)})

    def _member(
        self, stats: LatentStats, m: int, cosine: Tensor, match: Tensor, details: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """The index table's columns of member m."""
        fired = stats.fired[m]
        return {
            "frequency": _rounded(fired / stats.rows),
            "mean": _rounded(stats.total[m] / fired.clamp_min(1)),
            "max": _rounded(stats.largest[m]),
            "best": [_rounded(cosine[m, o]) for o in range(len(cosine))],
            "match": [match[m, o].tolist() for o in range(len(cosine))],
            "fires_on": [detail["fires_on"] for detail in details],
            "promotes": [detail["promoted"][:3] for detail in details],
        }

    def _latent(self, stats: LatentStats, windows: Tensor, logits: tuple[Top, Top], owner: int) -> dict[str, Any]:
        """One latent's page: its contexts, histogram and logit effects."""
        contexts = []
        fired_tokens: list[int] = []
        for value, row, acts in zip(stats.top.values[owner], stats.top.indices[owner], windows[owner]):
            if value <= 0:
                break
            sequence, position = (int(t) for t in token_position(row, self.context))
            first = max(1, position - BEFORE)
            last = min(self.context - 1, position + AFTER)
            tokens = self.sequences[sequence, first : last + 1].tolist()
            shown = acts[first - position + BEFORE : last - position + BEFORE + 1]
            contexts.append(
                {"tokens": tokens, "acts": _rounded(shown), "at": position - first, "value": _rounded(value)}
            )
            fired_tokens.append(tokens[position - first])
            self.token_ids.update(tokens)
        promoted, suppressed = (top.indices[owner].tolist() for top in logits)
        self.token_ids.update(promoted + suppressed)
        return {
            "contexts": contexts,
            "histogram": stats.histogram.flatten(0, 1)[owner].long().tolist(),
            "promoted": promoted,
            "promoted_logits": _rounded(logits[0].values[owner]),
            "suppressed": suppressed,
            "suppressed_logits": _rounded(logits[1].values[owner]),
            "fires_on": list(dict.fromkeys(fired_tokens))[:5],
        }

    def _script(self, name: str, target: str, value: Any) -> None:
        text = f"{target} = {json.dumps(value, separators=(',', ':'))};\n"
        (self.out / "data" / f"{name}.js").write_text(text, encoding="utf-8")


def _rounded(values: Tensor) -> Any:
    """Values to 4 significant digits, as lists (the site's files stay small): an integer over a power of ten is
    the double nearest that decimal, which JSON then writes with its 4 digits."""
    x = values.double().numpy()
    rounded = np.zeros_like(x)
    shown = np.isfinite(x) & (x != 0)
    digits = 3 - np.floor(np.log10(np.abs(x[shown])))
    up, down = 10.0 ** np.maximum(digits, 0), 10.0 ** np.maximum(-digits, 0)
    rounded[shown] = np.round(x[shown] * up / down) * down / up
    return rounded.tolist()
