"""Sparse probing (Kantamneni et al. 2025, "Are Sparse Autoencoders Useful? A Case Study in Sparse Probing") through
the `sae-probes` package, offline.

On each binary dataset it ships, sae-probes fits an L1 logistic regression on the k latents whose class means differ
most (per k), and a logistic regression on the raw activations (the baseline). It reads the activations from
`{cache}/model_activations_{model_name}/{dataset}_{hook}.pt` and, for a missing file, downloads a TransformerLens
model: `write_probe_activations` writes every file first, and `sparse_probing` refuses to start while one is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mfr_sae.data.lm_model import bos_token_id, outputs_at, resolve_hook
from mfr_sae.data.vectors import DataError
from mfr_sae.ensemble import Ensemble
from mfr_sae.extras import require
from mfr_sae.files import atomic_write

# The 25 binary datasets whose prompts are shortest in total (the sum of len(prompt) in characters over the CSV that
# sae-probes 0.4.2 ships; characters, since its prompt_len column is missing from 7 datasets), shortest first. The
# 25th holds 65k characters, the 26th (24_headline_isiran) 81k; together 48,738 prompts, 1.06M characters (331k
# SmolLM2 tokens), where all 113 datasets hold 334k prompts and 185M characters.
CHEAP_DATASETS = (
    "119_us_state_TX",
    "118_us_state_CA",
    "117_us_state_FL",
    "156_athlete_sport_baseball",
    "154_athlete_sport_football",
    "155_athlete_sport_basketball",
    "125_world_country_Italy",
    "123_world_country_United_Kingdom",
    "124_world_country_United_States",
    "120_us_timezone_Chicago",
    "131_temp_cat_Typical Time",
    "122_us_timezone_Los_Angeles",
    "121_us_timezone_New_York",
    "130_temp_cat_Frequency",
    "132_temp_cat_Event Ordering",
    "114_nyc_borough_Manhattan",
    "115_nyc_borough_Brooklyn",
    "116_nyc_borough_Bronx",
    "127_art_type_song",
    "128_art_type_movie",
    "134_context_type_Belief_states",
    "133_context_type_Causality",
    "126_art_type_book",
    "135_context_type_Event_duration",
    "129_arith_mc_A",
)

# sae-probes' own ks for the normal setting are 1, 2, 4, ..., 512; 256 and 512 are cut: for a member of width 4,608 on
# SmolLM2-135M's layer 15 they took 35 of the 42 s that its probes on one dataset took on 2 idle CPU cores (for each
# member and dataset), and they are far from sparse.
DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64, 128)
METRICS = ("test_auc", "test_f1", "test_acc")
SETTING = "normal"


def _sae_probes() -> ModuleType:
    require("sklearn", "sparse probing")  # named first: sae-probes fails on it otherwise, with a longer message
    return require("sae_probes", "sparse probing")


def probe_datasets(which: str | Sequence[str]) -> list[str]:
    """Dataset names: "cheap" gives CHEAP_DATASETS, "all" every binary dataset of sae-probes' normal setting, else
    the names given (a string: comma-separated)."""
    if which == "cheap":
        return list(CHEAP_DATASETS)
    known = list(_sae_probes().DATASETS)
    if which == "all":
        return known
    names = which.split(",") if isinstance(which, str) else list(which)  # no dataset name holds a comma
    for name in names:
        if name not in known:
            raise ValueError(
                f"unknown probing dataset {name!r}: the {len(known)} names are sae_probes.DATASETS (the files of "
                f"sae_probes/data/cleaned_data/), or say 'cheap' or 'all'"
            )
    return names


def activations_folder(cache: Path, model_name: str) -> Path:
    return Path(cache) / f"model_activations_{model_name}"


def activation_file(cache: Path, model_name: str, dataset: str, hook: str) -> Path:
    if "/" in hook:
        raise ValueError(f"hook {hook!r}: sae-probes puts the hook in a file name, so it may not contain '/'")
    return activations_folder(cache, model_name) / f"{dataset}_{hook}.pt"


def write_probe_activations(
    model: nn.Module,
    tokenizer: Any,
    hook: str,
    datasets: Sequence[str],
    cache: Path,
    model_name: str,
    batch_size: int = 64,
    max_length: int = 1024,
    progress: bool = True,
) -> Path:
    """For each dataset whose file is missing, the hooked module's output at each prompt's last token, float32
    [n_rows, d] in CSV order; returns the folder. Each prompt is BOS and its tokens, the last max_length - 1 of them
    where it is longer (sae-probes' TransformerLens tokenizer prepends BOS and cuts on the left; the project's SAEs
    are trained on sequences that start with BOS, data/activations.py).
    batch_size 64: SmolLM2-135M on 2 shared CPU cores ran short prompts 3 to 5 times faster than in batches of 16."""
    if max_length < 2:
        raise ValueError(f"max_length {max_length}: BOS and at least one token of the prompt")
    missing = [ds for ds in datasets if not activation_file(cache, model_name, ds, hook).exists()]
    folder = activations_folder(cache, model_name)
    if not missing:
        return folder
    read_dataset = _sae_probes().utils_data.read_numbered_dataset_df
    prompts = {ds: list(read_dataset(ds)["prompt"]) for ds in missing}
    _, module = resolve_hook(model, hook)
    folder.mkdir(parents=True, exist_ok=True)
    total = sum(len(texts) for texts in prompts.values())
    with tqdm(total=total, desc="probe activations", unit="prompt", disable=not progress) as bar:
        for ds, texts in prompts.items():
            ids = [with_bos(tokenizer, text, max_length) for text in texts]
            acts = outputs_at(model, module, ids, [len(row) - 1 for row in ids], batch_size, bar.update)
            _save(acts, activation_file(cache, model_name, ds, hook))
    return folder


def with_bos(tokenizer: Any, text: str, max_length: int) -> list[int]:
    """BOS (`bos_token_id`, as data/activations.py's sequences start) and the text's last max_length - 1 tokens."""
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not tokens:
        raise DataError(f"the probing prompt {text!r} has no tokens")
    return [bos_token_id(tokenizer), *tokens[max(len(tokens) - (max_length - 1), 0) :]]


def _save(acts: Tensor, path: Path) -> None:
    """Written atomically: a crash leaves no half-written file that sae-probes would read as complete."""
    atomic_write(path, lambda tmp: torch.save(acts.contiguous(), tmp))


class MemberEncoder:
    """One member of an ensemble (by position, not member id) as sae-probes uses an SAE: `encode(x)` gives its dense
    latents [B, h], as the member is saved (eval mode), on the CPU in float32."""

    def __init__(self, ensemble: Ensemble, member: int):
        self.ensemble = ensemble.select([member]).cpu().float().eval()
        self.W_dec = self.ensemble.decoder()[
            0
        ].detach()  # its decoder rows [h, d], SAELens's name (absorption reads them)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self.ensemble.dense_codes(x.to("cpu", torch.float32))[0]


def sparse_probing(
    encoders: Sequence[Any],
    model_name: str,
    hook: str,
    cache: Path,
    results: Path,
    datasets: Sequence[str],
    ks: Sequence[int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The baseline's and each encoder's probes on these datasets; returns the summary (see `summarize`). sae-probes
    reuses a result file it finds: the encoders' are kept under `results` (which belongs to these encoders), the
    baseline's beside the activations in `cache`, since they depend on nothing else and cost far more (SmolLM2-135M's
    layer 15 on 2 CPU cores: up to a minute a dataset when idle, against 7 s for a member), so that each model and hook
    pays once."""
    sae_probes = _sae_probes()
    results = Path(results)
    ks, datasets = list(DEFAULT_KS if ks is None else ks), list(datasets)
    for ds in datasets:
        if not activation_file(cache, model_name, ds, hook).exists():
            raise DataError(f"missing {activation_file(cache, model_name, ds, hook)}: write_probe_activations first")
    common = {"model_name": model_name, "hook_name": hook, "setting": SETTING, "model_cache_path": cache}
    steps = len(datasets) * (1 + len(encoders))
    with tqdm(total=steps, desc="sparse probing", unit="probe", disable=not progress) as bar, _quiet():
        for ds in datasets:  # datasets outermost: the bar's expected time mixes baseline and members as the run does
            sae_probes.run_baseline_evals(method="logreg", results_path=cache, datasets=[ds], device="cpu", **common)
            bar.update()
            for i, encoder in enumerate(encoders):
                _drop_other_ks(_member_file(results, i, model_name, ds, hook), ks)
                folder = _member_folder(results, i)
                sae_probes.run_sae_evals(
                    sae=encoder, reg_type="l1", ks=ks, results_path=folder, datasets=[ds], device="cpu", **common
                )
                bar.update()
    return summarize(results, cache, len(encoders), model_name, hook, datasets, ks)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """sae-probes prints a line and draws a bar per dataset: one bar says it all. scikit-learn 1.8-1.9 warns at each
    fit that `penalty=` is deprecated (gone in 1.10, which the `evals` extra excludes), and where one hits max_iter."""
    with (
        open(os.devnull, "w") as sink,
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", module=r"sklearn\.linear_model\.")
        yield


def _member_folder(results: Path, member: int) -> Path:
    return Path(results) / f"member_{member}"  # one per member: sae-probes skips a dataset whose file exists


def _member_file(results: Path, member: int, model_name: str, dataset: str, hook: str) -> Path:
    setting = _member_folder(results, member) / f"sae_probes_{model_name}" / f"{SETTING}_setting"
    return setting / f"{dataset}_{hook}_l1.json"


def _baseline_file(cache: Path, model_name: str, dataset: str, hook: str) -> Path:
    setting = Path(cache) / f"baseline_results_{model_name}" / f"{SETTING}_setting"
    return setting / f"{dataset}_{hook}_logreg.json"


def _drop_other_ks(path: Path, ks: list[int]) -> None:
    """A file left by a run with other ks would be reused as it stands."""
    if path.exists() and [entry["k"] for entry in json.loads(path.read_text())] != ks:
        path.unlink()


def _metrics(entry: dict[str, Any]) -> dict[str, float]:
    return {name: float(entry[name]) for name in METRICS}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {name: sum(row[name] for row in rows) / len(rows) for name in METRICS}


def summarize(
    results: Path, cache: Path, n_members: int, model_name: str, hook: str, datasets: list[str], ks: list[int]
) -> dict[str, Any]:
    """{"datasets", "ks", "baseline": {metric: mean over datasets, "per_dataset": {ds: {metric}}}, "members": [{"by_k":
    {k: {metric: mean over datasets}}, "per_dataset": {ds: {k: {metric}}}}]}, k as a string (a JSON key)."""
    baseline = {ds: _metrics(json.loads(_baseline_file(cache, model_name, ds, hook).read_text())[0]) for ds in datasets}
    members = []
    for i in range(n_members):
        per_dataset = {}
        for ds in datasets:
            entries = json.loads(_member_file(results, i, model_name, ds, hook).read_text())
            per_dataset[ds] = {str(entry["k"]): _metrics(entry) for entry in entries}
        by_k = {str(k): _mean([per_dataset[ds][str(k)] for ds in datasets]) for k in ks}
        members.append({"by_k": by_k, "per_dataset": per_dataset})
    summary_of_baseline = {**_mean(list(baseline.values())), "per_dataset": baseline}
    return {"datasets": datasets, "ks": ks, "baseline": summary_of_baseline, "members": members}
