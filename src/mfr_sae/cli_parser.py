"""The parser of the `mfr-sae` command line: its subcommands and their options, and the help formatter that
wraps the config field list of `mfr-sae train --help` to the terminal."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from mfr_sae.config import EEG_NOISE_KINDS, help_text
from mfr_sae.study_catalogue import JUDGED_SPLITS

if TYPE_CHECKING:
    from mfr_sae.evaluate import EvaluationOptions


class WrappingRawFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's and epilog's line breaks and indentation (the config field list) but
    wraps each line longer than the terminal, continuing at the line's own indentation."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            lead = indent + line[: len(line) - len(line.lstrip())]
            lines += textwrap.wrap(
                line.strip(),
                max(width, len(lead) + 20),
                initial_indent=lead,
                subsequent_indent=lead,
                break_long_words=False,
                break_on_hyphens=False,
            ) or [""]
        return "\n".join(lines)


def add_lm_source(p: argparse.ArgumentParser, note: str = "") -> None:
    """--model, --hook and --text: the language model, its hooked module and the text (`note` leads their help)."""
    p.add_argument("--model", default="gpt2", help=f"{note}HF model name or local path (folder or .gguf file)")
    p.add_argument(
        "--hook",
        default="blocks.0.hook_mlp_out",
        help=f"{note}HF module path (transformer.h.0.mlp) or TransformerLens alias (blocks.0.hook_mlp_out)",
    )
    p.add_argument(
        "--text",
        default="Skylion007/openwebtext",
        help=f"{note}HF dataset name (streamed) or a local .txt / .jsonl file or folder",
    )


def add_overrides(p: argparse.ArgumentParser, help: str) -> None:
    """--set SECTION.FIELD=VALUE, repeatable, into `overrides`."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE", help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mfr-sae", description="The `mfr-sae` command line.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser(
        "train",
        help="train an ensemble of TopK SAEs (baseline or MFR)",
        description="Train an ensemble of TopK SAEs. Without --config, the built-in defaults "
        "(the paper's synthetic setting) are used.",
        epilog=help_text(),
        formatter_class=WrappingRawFormatter,
    )
    p.add_argument("--config", type=Path, help="YAML file with sections data, sae, train, mfr, eval")
    p.add_argument("--out", type=Path, help="run folder to create (config, logs, checkpoint, results)")
    add_overrides(p, "override one config field (repeatable)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out with a new one (its files are deleted only once "
        "the new config is validated)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = commands.add_parser(
        "reproduce",
        help="reproduce one of the paper's experiments",
        description="Reproduce an experiment of the paper: writes DIR/report.md, "
        "DIR/results.json, figures (PNG) and the runs (DIR/runs/).",
    )
    p.add_argument("experiment", choices=["synthetic", "gpt2", "eeg"])
    p.add_argument("--out", type=Path, required=True, help="output folder (finished runs in it are reused)")
    p.add_argument("--quick", action="store_true", help="a small version that runs in minutes on a CPU")
    p.add_argument(
        "--seeds",
        type=int,
        help="synthetic: number of seeds (default: 3 with --quick, else 5); eeg: number of seeds (default 1)",
    )
    add_lm_source(p, "gpt2: ")
    p.add_argument("--tokens", type=int, help="gpt2: training tokens (default 2,000,000; --quick 100,000)")
    p.add_argument(
        "--data",
        type=Path,
        help="eeg: EDF/BDF/FIF/BrainVision file or folder (e.g. your TUH EDF "
        "folder); default: the real recordings of `python -m mfr_sae.offline eeg`",
    )
    p.add_argument("--noise", default="white", choices=EEG_NOISE_KINDS, help="eeg: corruption of the input")
    p.add_argument("--snr-db", type=float, default=0.0, help="eeg: SNR of the corrupted input in dB")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = commands.add_parser(
        "study",
        help="which MFR setting, chosen on tuning data, beats the baseline on held-out data? (replicates)",
        description="Train the baseline and candidate MFR settings on a tuning split of learnable data, pick one, "
        "then judge it and the defaults against the baseline on held-out splits (other true features, other "
        "replicates) of several datasets and sizes (or, with --judge-on test, only the defaults on a test split, "
        "once); writes DIR/report.md (the verdict first), DIR/results.json "
        "and DIR/fig_fvu_mcc.png. Finished runs in DIR are reused.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="small data and short runs: about 10 minutes on 2 CPU cores")
    p.add_argument("--replicates", type=int, default=5, help="independent held-out replicates per setting (>= 2)")
    p.add_argument(
        "--large-replicates",
        type=int,
        default=3,
        help="held-out replicates per setting on the datasets above h = 1,024 (learnable-large: minutes a run)",
    )
    p.add_argument("--tune-replicates", type=int, default=3, help="independent tuning replicates per setting (>= 2)")
    p.add_argument(
        "--tune-on",
        default="learnable",
        help="the datasets whose tuning splits choose the setting, comma-separated (it must gain on every one)",
    )
    p.add_argument(
        "--candidates",
        default="",
        help="the candidate settings to tune, comma-separated names (default: all; the report lists them)",
    )
    p.add_argument(
        "--data",
        default="learnable,learnable-large,hierarchical,paper",
        help="held-out datasets, comma-separated: learnable (h 1,024), learnable-large (h 4,096), hierarchical "
        "(correlated features, h 1,024), paper, synthsaebench-16k (SynthSAEBench-16k at h 4,096, L0 25; the extra "
        "[synth]; not in the default list)",
    )
    p.add_argument(
        "--architectures",
        default="topk",
        help="the architectures judged on every judged dataset, comma-separated, each alone and with the defaults "
        "of mfr.*: topk (each dataset as it stands: TopK, on synthsaebench-16k TopK + AuxK; with the setting "
        "tuned on it), auxk (TopK + AuxK), batchtopk, matryoshka, batchtopk-auxk (BatchTopK + AuxK with a "
        "10,000-vector dead window) (default: topk)",
    )
    p.add_argument(
        "--judge-on",
        default="heldout",
        choices=JUDGED_SPLITS,
        help="the split judged: heldout (tune on the tuning split, then judge; it was read while the defaults "
        "changed, a validation set now) or test (no tuning, nothing chosen: the baseline and the frozen defaults of "
        "mfr.* alone, judged once on a split no choice has seen; runs in OUT/test/)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress output")

    p = commands.add_parser(
        "study-lm",
        help="do the defaults of mfr.* beat the baseline on a language model's activations? (seeds)",
        description="Cache the activations of one module of a language model, train the baseline and the defaults "
        "of mfr.* for each seed (5 TopK members, k 6 to 30, h = 4d: the paper's Section 4.1 shape) and compare "
        "them, paired over seeds: FVU, loss recovered, KL, the members' agreement and agreement across seeds. "
        "Writes DIR/report.md (the verdict first) and DIR/results.json; finished runs in DIR are reused.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    add_lm_source(p)
    p.add_argument("--tokens", type=int, help="training tokens per run (default 2,000,000; --quick 100,000)")
    p.add_argument(
        "--cache-tokens",
        type=int,
        help="activations to cache (default: --tokens plus the 10,000 held out; fewer: several passes over them)",
    )
    p.add_argument("--seeds", type=int, default=3, help="independent seeds (>= 2), each a baseline and an MFR run")
    p.add_argument("--context", type=int, default=128, help="tokens per cached sequence, BOS included")
    p.add_argument("--quick", action="store_true", help="100,000 training tokens a run")
    add_overrides(p, "override one config field of every run (repeatable)")
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="evaluate every run as `mfr-sae evaluate` does and test the headline numbers of sparse probing (AUC "
        "with 1 and 16 latents) and absorption (fraction, full) beside FVU, loss recovered and KL (extra evals)",
    )
    add_evaluation_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress output")

    p = commands.add_parser(
        "cache",
        help="cache activations of a language model on disk",
        description="Run a Hugging Face causal LM over text and store the output of "
        "one module as sharded .npy arrays with a manifest; train on it "
        "with --set data.kind=activations --set data.path=DIR.",
    )
    add_lm_source(p)
    p.add_argument("--out", type=Path, required=True, help="cache folder (a matching cache there is reused)")
    p.add_argument("--tokens", type=int, default=2_000_000, help="activation vectors to store")
    p.add_argument("--context", type=int, default=128, help="tokens per sequence, BOS included")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--shard-tokens", type=int, default=1_000_000, help="vectors per shard file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")

    p = commands.add_parser(
        "compare",
        help="agreement between runs: PW-MCC and shared-latent fraction",
        description="Compare runs member by member (same k with same k): PW-MCC and "
        "the shared-latent fraction, in DIR/compare.json, with a histogram "
        "of matched cosines in DIR/matched_cosines.png.",
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders (or checkpoint folders)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--threshold", type=float, default=0.7, help="cosine above which a latent is shared")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the comparison already in --out (without it, such a folder is refused)",
    )

    p = commands.add_parser(
        "verify",
        help="check a run's checkpoint against the SHA-256 of its files recorded when they were written",
        description="Check every file of a run's checkpoint that has a recorded SHA-256: one line per missing "
        "or corrupt file (exit status 1), or one line saying that the checkpoint is intact.",
    )
    p.add_argument("run", type=Path, metavar="RUN", help="run folder (or checkpoint folder)")

    p = commands.add_parser(
        "browse",
        help="a static site of a run on language-model activations: each latent's top contexts, histogram, "
        "the tokens it promotes, and its matches in the other members",
        description="One pass over the run's activation cache (token ids recomputed from its manifest), then a "
        "site in OUT (index.html; no network, opens from the file system): an index per member, a page per latent "
        "and what the members share, against a baseline run with --baseline.",
    )
    p.add_argument("run", type=Path, metavar="RUN", help="run folder trained on an activation cache")
    p.add_argument("--out", type=Path, required=True, help="folder of the site")
    p.add_argument("--baseline", type=Path, help="a run whose members' shared latents to compare with")
    p.add_argument("--contexts", type=int, default=20, help="top activating contexts kept per latent")
    p.add_argument("--max-rows", type=int, help="read only the cache's first rows (default: all of it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = commands.add_parser(
        "evaluate",
        help="the field's evaluations of a run on language-model activations, offline: sparse probing (sae-probes) "
        "and first-letter absorption (SAEBench's method), per member",
        description="Sparse probing through sae-probes (the model's activations for its binary tasks written by "
        "mfr-sae's loader; the probe on raw activations as reference) and first-letter absorption by SAEBench's "
        "method and thresholds, for every member, beside the run's own core metrics: RUN/evaluation.json "
        "(sections core, probing, absorption) and RUN/evaluation.md. Needs the extras lm and evals.",
    )
    p.add_argument("run", type=Path, metavar="RUN", help="run folder trained on an activation cache")
    add_evaluation_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def add_evaluation_options(p: argparse.ArgumentParser) -> None:
    """What `evaluate` and `study-lm --evaluate` measure (read back by evaluation_options)."""
    p.add_argument(
        "--probe-datasets",
        default="cheap",
        help="sae-probes tasks: cheap (the shortest prompts: minutes on a CPU), all, or names, comma-separated",
    )
    p.add_argument("--absorption-words", type=int, help="words of the vocabulary the letter probe reads (a sample)")
    p.add_argument("--probe-cache", type=Path, help="folder of the model activations sae-probes reads (reused)")
    p.add_argument("--no-probing", action="store_true", help="skip sparse probing")
    p.add_argument("--no-absorption", action="store_true", help="skip absorption")
    p.add_argument("--device", default="cpu", help="where the model and the SAEs run for the evaluation")


def evaluation_options(args: argparse.Namespace) -> EvaluationOptions:
    """The options add_evaluation_options added, read back."""
    from mfr_sae.evaluate import EvaluationOptions

    return EvaluationOptions(
        args.probe_datasets,
        args.absorption_words,
        probing=not args.no_probing,
        absorption=not args.no_absorption,
        activations=args.probe_cache,
        device=args.device,
        progress=not args.no_progress,
    )
