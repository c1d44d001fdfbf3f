"""`mfr-sae evaluate RUN`: the field's own evaluations of a run trained on a language model's activations, offline.

- probing: sparse probing (Kantamneni et al. 2025) through sae-probes (probing.py): the model's activations for its
  binary tasks written by our loader in its cache format, then each member's k-sparse probes and the probe on the raw
  activations (the reference row);
- absorption: first-letter absorption (Chanin et al. 2024) by SAEBench's method and thresholds (absorption.py), the
  letter probe once for the model and hook, then each member; "not measurable" with the filter's numbers when the
  model knows too few letters;
- core: what the run's own evaluation measured (FVU, L0, dead latents, loss recovered, KL).

Writes RUN/evaluation.json (sections core, probing, absorption) and RUN/evaluation.md. Needs the extras `lm` and
`evals`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mfr_sae.checkpoint import load
from mfr_sae.config import load_run_config
from mfr_sae.data.activations import read_manifest
from mfr_sae.data.lm_model import context_length, load_model
from mfr_sae.errors import ConfigError
from mfr_sae.files import atomic_write_text, read_json, write_json
from mfr_sae.offline import cache_dir
from mfr_sae.report import fmt_num, markdown_table
from mfr_sae.run_folder import CONFIG_FILE, RESULTS_FILE

EVALUATION_FILE = "evaluation.json"
EVALUATION_REPORT = "evaluation.md"
CORE = ("fvu", "l0", "dead_frac", "frac_recovered", "kl")  # per member, from results.json where measured


def lm_run(run_dir: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(config, results, the activation cache's manifest) of a finished run on LM activations, else a one-line
    error naming what is wrong."""
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"mfr-sae evaluate: {run_dir / CONFIG_FILE} not found (not a run folder)")
    cfg = load_run_config(run_dir / CONFIG_FILE)
    if cfg.data.kind != "activations":
        raise ConfigError(
            f"mfr-sae evaluate: {run_dir} was trained on data.kind={cfg.data.kind}, not on a language model's "
            "activations (data.kind=activations, `mfr-sae cache`): probing and absorption need the model"
        )
    if not (run_dir / RESULTS_FILE).is_file():
        raise ConfigError(
            f"mfr-sae evaluate: {run_dir} has no {RESULTS_FILE}: finish it first (mfr-sae train --resume)"
        )
    return cfg, read_json(run_dir / RESULTS_FILE), read_manifest(cfg.data.path, verify=False)


def model_label(model: str) -> str:
    """The model's name in sae-probes' file names (which allow no "/"): a hub name's or a file's last part."""
    return Path(model.rstrip("/")).name.removesuffix(".gguf").replace("/", "_") or "model"


def probe_cache() -> Path:
    """Where the model activations sae-probes reads are kept by default: shared by every run on the same model."""
    return cache_dir() / "probe-activations"


def core_metrics(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each member's core measures from the run's own evaluation."""
    return [{key: member[key] for key in ("member", "k", *CORE) if key in member} for member in results["members"]]


def evaluate_run(
    run_dir: str | Path,
    probe_datasets: str = "cheap",
    absorption_words: int | None = None,
    probing: bool = True,
    absorption: bool = True,
    activations: Path | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every member of a run; writes and returns evaluation.json's content."""
    from mfr_sae import absorption as letters  # the extra [evals] only when asked for
    from mfr_sae import probing as probes

    run_dir = Path(run_dir)
    cfg, results, manifest = lm_run(run_dir)
    model, tokenizer = load_model(manifest["model"], device)
    ensemble = load(run_dir, device)
    encoders = [probes.MemberEncoder(ensemble, m) for m in range(ensemble.n_members)]
    hook = manifest["hook"]
    evaluation: dict[str, Any] = {"run": str(run_dir), "model": manifest["model"], "hook": hook}
    evaluation["core"] = core_metrics(results)
    if probing:
        try:
            names = probes.probe_datasets(probe_datasets)
        except ValueError as err:
            raise ConfigError(f"--probe-datasets: {err}") from None
        model_name = model_label(manifest["model"])
        cache = activations or probe_cache()
        context = context_length(model) or 1024  # prompts keep their last tokens within the model's positions
        probes.write_probe_activations(
            model, tokenizer, hook, names, cache, model_name, max_length=min(1024, context), progress=progress
        )
        evaluation["probing"] = probes.sparse_probing(
            encoders, model_name, hook, cache, run_dir / "evaluation" / "probing", names, progress=progress
        )
    if absorption:
        with torch.no_grad():
            words = letters.N_WORDS if absorption_words is None else absorption_words
            probe = letters.letter_probe(model, tokenizer, hook, n_words=words, progress=progress)
        evaluation["absorption"] = {
            "letters": probe.summary(),
            "members": [letters.absorption(encoder, probe, progress=progress) for encoder in encoders],
        }
    write_json(run_dir / EVALUATION_FILE, evaluation)
    atomic_write_text(run_dir / EVALUATION_REPORT, report(evaluation))
    return evaluation


def report(evaluation: dict[str, Any]) -> str:
    """evaluation.md: a table per section, one row per member."""
    lines = [f"# Evaluation of {evaluation['run']}", "", f"Model `{evaluation['model']}`, hook `{evaluation['hook']}`."]
    lines += ["", "## Core (the run's own evaluation)", "", markdown_table(evaluation["core"])]
    if "probing" in evaluation:
        lines += ["", "## Sparse probing (sae-probes, normal setting)", "", probing_table(evaluation["probing"])]
    if "absorption" in evaluation:
        lines += ["", "## First-letter absorption (SAEBench's method)", "", *absorption_lines(evaluation["absorption"])]
    return "\n".join(lines) + "\n"


def probing_table(probing: dict[str, Any]) -> str:
    """Mean test AUC over the tasks at each k, a row per member, the raw-activation probe first."""
    rows = [{"probe": "raw activations (reference)", "AUC": fmt_num(probing["baseline"]["test_auc"])}]
    for i, member in enumerate(probing["members"]):
        row = {"probe": f"member {i}"}
        row |= {f"AUC k={k}": fmt_num(scores["test_auc"]) for k, scores in member["by_k"].items()}
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return markdown_table([{c: row.get(c, "-") for c in columns} for row in rows], columns)


def absorption_lines(absorption: dict[str, Any]) -> list[str]:
    """The letter filter's numbers, then each member's means (or why nothing was measured)."""
    letters = absorption["letters"]
    lines = [
        f"Letters the model's probe knows (test F1 > 0.6): {letters['letters_passing']} of 26 (SAEBench needs 20).",
        "",
    ]
    keys = ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features")
    rows = []
    for i, member in enumerate(absorption["members"]):
        if not member.get("measurable", True):
            rows.append({"member": i, **{key: "not measurable" for key in keys}})
        else:
            rows.append({"member": i, **{key: fmt_num(member[key]) for key in keys}})
    return [*lines, markdown_table(rows)]
