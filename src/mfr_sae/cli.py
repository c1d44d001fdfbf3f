"""The `mfr-sae` command line."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from mfr_sae import distributed
from mfr_sae.checkpoint import CheckpointError
from mfr_sae.config import EEG_NOISE_KINDS, ConfigError, help_text, load_config
from mfr_sae.cpu_memory import keep_freed_cpu_memory
from mfr_sae.data import DataError
from mfr_sae.distributed import RankLost, world_from_env
from mfr_sae.extras import MissingExtra
from mfr_sae.report import fmt_num, markdown_table
from mfr_sae.train import Interrupted, TrainingError, resume, train

USER_ERRORS = (ConfigError, CheckpointError, DataError, TrainingError, RankLost, MissingExtra, FileNotFoundError)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a run stopped by Ctrl-C


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mfr-sae", description=__doc__)
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
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field (repeatable)",
    )
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
    p.add_argument("--model", default="gpt2", help="gpt2: HF model name or local path (folder or .gguf file)")
    p.add_argument(
        "--text",
        default="Skylion007/openwebtext",
        help="gpt2: HF dataset name (streamed) or a local .txt / .jsonl file or folder",
    )
    p.add_argument("--hook", default="blocks.0.hook_mlp_out", help="gpt2: the hooked module")
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
        help="does any MFR setting beat the baseline where the truth is known? (grid x replicates)",
        description="Train the baseline and MFR over a grid of beta x similarity form on learnable and on the "
        "paper's synthetic data, with independent replicates; writes DIR/report.md (the verdict "
        "first), DIR/results.json and DIR/fig_fvu_mcc.png. Finished runs in DIR are reused.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="small data and short runs: about 7 minutes on 2 CPU cores")
    p.add_argument("--replicates", type=int, default=5, help="independent replicates per setting (>= 2)")
    p.add_argument("--data", choices=["both", "learnable", "paper"], default="both", help="which datasets")
    p.add_argument("--no-progress", action="store_true", help="no progress output")

    p = commands.add_parser(
        "cache",
        help="cache activations of a language model on disk",
        description="Run a Hugging Face causal LM over text and store the output of "
        "one module as sharded .npy arrays with a manifest; train on it "
        "with --set data.kind=activations --set data.path=DIR.",
    )
    p.add_argument("--model", default="gpt2", help="HF model name or local path (folder or .gguf file)")
    p.add_argument(
        "--hook",
        default="blocks.0.hook_mlp_out",
        help="HF module path (transformer.h.0.mlp) or TransformerLens alias (blocks.0.hook_mlp_out)",
    )
    p.add_argument(
        "--text",
        default="Skylion007/openwebtext",
        help="HF dataset name (streamed) or a local .txt / .jsonl file or folder",
    )
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
    return parser


def run_compare(args: argparse.Namespace) -> int:
    from mfr_sae.compare import compare

    summary = compare(args.runs, args.out, args.threshold, overwrite=args.overwrite)
    rows = [{k: m[k] for k in ("k", "member_of_k", "pw_mcc", "shared_frac")} for m in summary["members"]]
    print(markdown_table(rows, ["k", "member_of_k", "pw_mcc", "shared_frac"]))
    print(
        f"\nmean over members and run pairs: pw_mcc={fmt_num(summary['pw_mcc'])}, "
        f"shared_frac={fmt_num(summary['shared_frac'])}; written to {args.out / 'compare.json'}"
    )
    print(
        "twin_frac (latents with a same-SAE twin at cosine > 0.9), mean over members: "
        + ", ".join(f"{t['run']} {fmt_num(t['mean'])}" for t in summary["twin_frac"])
    )
    return 0


def run_cache(args: argparse.Namespace) -> int:
    from mfr_sae.data.activations import build_cache, read_manifest

    if args.tokens < 1 or args.context < 2:
        raise ConfigError("cache needs --tokens >= 1 and --context >= 2")
    out = build_cache(
        args.model,
        args.hook,
        args.text,
        args.out,
        args.tokens,
        args.context,
        args.batch_size,
        args.dtype,
        args.shard_tokens,
        args.device,
        not args.no_progress,
    )
    manifest = read_manifest(out, verify=False)
    print(
        f"cache: {out} ({manifest['n_tokens']} vectors of d={manifest['d']} from {manifest['module']}, "
        f"{len(manifest['shards'])} shards)"
    )
    return 0


def run_study(args: argparse.Namespace) -> int:
    from mfr_sae.study import study

    if args.replicates < 2:
        raise ConfigError(f"--replicates {args.replicates}: a paired test needs at least 2")
    datasets = ("learnable", "paper") if args.data == "both" else (args.data,)
    summary = study(args.out, args.quick, args.replicates, datasets, progress=not args.no_progress)
    for name, data in summary["datasets"].items():
        print(
            f"{name}: "
            + (
                f"{data['best']} beats the baseline"
                if data["best"]
                else "no MFR setting beat the baseline on MCC without losing FVU"
            )
        )
    print(f"report: {args.out / 'report.md'}")
    return 0


def run_reproduce(args: argparse.Namespace) -> int:
    if args.experiment == "gpt2":
        from mfr_sae.reproduce.gpt2 import reproduce_gpt2

        if args.tokens is not None and args.tokens < 500:
            raise ConfigError(f"--tokens {args.tokens}: must be at least one batch (500)")
        reproduce_gpt2(args.out, args.quick, args.model, args.text, args.hook, not args.no_progress, tokens=args.tokens)
    elif args.experiment == "eeg":
        from mfr_sae.reproduce.eeg import reproduce_eeg

        if args.seeds is not None and args.seeds < 1:
            raise ConfigError(f"--seeds {args.seeds}: must be >= 1")
        reproduce_eeg(
            args.out, args.data, args.quick, args.seeds or 1, args.noise, args.snr_db, progress=not args.no_progress
        )
    else:
        from mfr_sae.reproduce.synthetic import reproduce_synthetic

        if args.seeds is not None and args.seeds < 1:
            raise ConfigError(f"--seeds {args.seeds}: must be >= 1")
        reproduce_synthetic(args.out, args.quick, args.seeds, progress=not args.no_progress)
    print(f"report: {args.out / 'report.md'}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.resume:
        if args.config or args.overrides or args.out or args.overwrite:
            raise ConfigError("--resume takes the run's own config.yaml: drop --config, --set, --out and --overwrite")
        results = resume(args.resume, progress=progress)
        out = args.resume
    else:
        if args.out is None:
            raise ConfigError("train needs --out DIR (or --resume DIR)")
        results = train(load_config(args.config, args.overrides), args.out, progress=progress, overwrite=args.overwrite)
        out = args.out
    if world_from_env()[0] == 0:  # under torchrun, rank 0 speaks for all
        print(markdown_table(results["members"]))
        print(f"\nrun folder: {out} (results.json, metrics.jsonl, checkpoint/)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_cpu_memory()  # this process is ours: training on a CPU keeps its gradient buffers (cpu_memory.py)
    try:
        commands = {
            "train": run_train,
            "reproduce": run_reproduce,
            "compare": run_compare,
            "cache": run_cache,
            "study": run_study,
        }
        code = commands[args.command](args)
    except USER_ERRORS as err:
        print(f"mfr-sae: error: {err}", file=sys.stderr)
        code = 2
    except Interrupted as err:  # Ctrl-C in training; the message says how to continue from the last checkpoint
        print(f"mfr-sae: {err}", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("mfr-sae: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    if distributed.close():  # under torchrun: leave without the interpreter's teardown (see close)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
