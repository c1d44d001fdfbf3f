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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mfr_sae.absorption import MIN_F1, MIN_LETTERS
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


@dataclass(frozen=True)
class EvaluationOptions:
    """What `mfr-sae evaluate` (and `study-lm --evaluate`) measures, and how."""

    probe_datasets: str = "cheap"  # sae-probes tasks: cheap, all, or names, comma-separated
    absorption_words: int | None = None  # words the letter probe reads (None: absorption.N_WORDS)
    probing: bool = True
    absorption: bool = True
    activations: Path | None = None  # the model activations sae-probes reads (None: probe_cache())
    device: str = "cpu"
    progress: bool = True


class Evaluator:
    """The model's side of an evaluation, paid once for every run on the same model and hook (`mfr-sae study-lm`
    evaluates several): the model, the probe tasks' activations (and, kept beside them, the raw-activation probes)
    and the letter probe."""

    def __init__(self, model: str, hook: str, options: EvaluationOptions = EvaluationOptions()):
        from mfr_sae import probing as probes  # the extra [evals] only when asked for

        self.model_path, self.hook, self.options = model, hook, options
        self.probe_names: list[str] = []
        if options.probing:
            try:
                self.probe_names = probes.probe_datasets(options.probe_datasets)
            except ValueError as err:
                raise ConfigError(f"--probe-datasets: {err}") from None
        self.model, self.tokenizer = load_model(model, options.device)
        self.model_name = model_label(model)
        self.activations = options.activations or probe_cache()
        self._letter_probe: Any = None

    def letter_probe(self) -> Any:
        """SAEBench's first-letter probe of the model at the hook: made at the first run that needs it."""
        from mfr_sae import absorption as letters

        if self._letter_probe is None:
            words = self.options.absorption_words
            with torch.no_grad():
                self._letter_probe = letters.letter_probe(
                    self.model,
                    self.tokenizer,
                    self.hook,
                    n_words=letters.N_WORDS if words is None else words,
                    progress=self.options.progress,
                )
        return self._letter_probe

    def evaluate(self, run_dir: str | Path) -> dict[str, Any]:
        """Evaluate every member of a run on this model and hook; writes and returns evaluation.json's content."""
        from mfr_sae import absorption as letters
        from mfr_sae import probing as probes

        run_dir, progress = Path(run_dir), self.options.progress
        _, results, manifest = lm_run(run_dir)
        if (manifest["model"], manifest["hook"]) != (self.model_path, self.hook):
            raise ConfigError(
                f"mfr-sae evaluate: {run_dir} was trained on {manifest['model']} at {manifest['hook']}, not "
                f"{self.model_path} at {self.hook}"
            )
        ensemble = load(run_dir, self.options.device)
        encoders = [probes.MemberEncoder(ensemble, m) for m in range(ensemble.n_members)]
        evaluation: dict[str, Any] = {"run": str(run_dir), "model": self.model_path, "hook": self.hook}
        evaluation["core"] = core_metrics(results)
        if self.probe_names:
            context = context_length(self.model) or 1024  # prompts keep their last tokens within the model's positions
            probes.write_probe_activations(
                self.model,
                self.tokenizer,
                self.hook,
                self.probe_names,
                self.activations,
                self.model_name,
                max_length=min(1024, context),
                progress=progress,
            )
            evaluation["probing"] = probes.sparse_probing(
                encoders,
                self.model_name,
                self.hook,
                self.activations,
                run_dir / "evaluation" / "probing",
                self.probe_names,
                progress=progress,
            )
        if self.options.absorption:
            probe = self.letter_probe()
            evaluation["absorption"] = {
                "letters": probe.summary(),
                "members": [letters.absorption(encoder, probe, progress=progress) for encoder in encoders],
            }
        write_json(run_dir / EVALUATION_FILE, evaluation)
        atomic_write_text(run_dir / EVALUATION_REPORT, report(evaluation))
        return evaluation


def evaluate_run(run_dir: str | Path, options: EvaluationOptions = EvaluationOptions()) -> dict[str, Any]:
    """Evaluate every member of a run; writes and returns evaluation.json's content."""
    _, _, manifest = lm_run(Path(run_dir))
    return Evaluator(manifest["model"], manifest["hook"], options).evaluate(run_dir)


# per member, the headline number of each evaluation (higher is better?): what `study-lm --evaluate` tests
HEADLINE = {"probe_auc_k1": True, "probe_auc_k16": True, "absorption_fraction": False, "full_absorption": False}
DESCRIBED = ("split_latents",)


def headline(evaluation: dict[str, Any]) -> list[dict[str, float | None]]:
    """Each member's headline numbers: sparse probing's mean test AUC over the tasks with k = 1 and 16 latents;
    absorption's mean fraction, full absorption and split latents (None where absorption is not measurable or
    a section was not run)."""
    n = len(evaluation["core"])
    members: list[dict[str, float | None]] = [dict.fromkeys([*HEADLINE, *DESCRIBED]) for _ in range(n)]
    for row, probes in zip(members, (evaluation.get("probing") or {}).get("members", [])):
        row["probe_auc_k1"] = probes["by_k"]["1"]["test_auc"]
        row["probe_auc_k16"] = probes["by_k"]["16"]["test_auc"]
    for row, letters in zip(members, (evaluation.get("absorption") or {}).get("members", [])):
        if letters.get("measurable", True):
            row["absorption_fraction"] = letters["mean_absorption_fraction_score"]
            row["full_absorption"] = letters["mean_full_absorption_score"]
            row["split_latents"] = letters["mean_num_split_features"]
    return members


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
        f"Letters the model's probe knows (test F1 > {MIN_F1}): {letters['letters_passing']} of 26 (SAEBench needs "
        f"{MIN_LETTERS}).",
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
