"""The `mfr-sae` command line: each subcommand's handler and `main` (the parser is in `cli_parser.py`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Collection

from mfr_sae import process_group
from mfr_sae.cli_parser import build_parser, evaluation_options
from mfr_sae.config import ConfigError, load_config
from mfr_sae.cpu_memory import keep_freed_cpu_memory
from mfr_sae.data import DataError
from mfr_sae.errors import CheckpointError
from mfr_sae.extras import MissingExtra
from mfr_sae.files import refused_write
from mfr_sae.process_group import RankLost, world_from_env
from mfr_sae.report import fmt_num, markdown_table
from mfr_sae.run_folder import TrainingError
from mfr_sae.train import Interrupted, resume, train

USER_ERRORS = (ConfigError, CheckpointError, DataError, TrainingError, RankLost, MissingExtra, FileNotFoundError)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a run stopped by Ctrl-C
EXIT_CORRUPT = 1  # verify found a problem (2 stays a command that could not run, as for every subcommand)


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


def run_browse(args: argparse.Namespace) -> int:
    from mfr_sae.browse_writer import browse

    summary = browse(args.run, args.out, args.baseline, args.contexts, args.max_rows, progress=not args.no_progress)
    shares = ", ".join(f"member {m['id']} {m['shared']:.1%}" for m in summary["members"])
    print(f"latents shared by all members (best match at cosine >= {summary['shared_cosine']}): {shares}")
    if "baseline" in summary:
        print("the baseline's: " + ", ".join(f"{s:.1%}" for s in summary["baseline"]["shared"]))
    print(f"site: {args.out / 'index.html'} (open it, or serve the folder: python -m http.server -d {args.out})")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from mfr_sae.checkpoint import find_checkpoint
    from mfr_sae.digests import verify_checkpoint

    folder = find_checkpoint(args.run)
    problems, checked = verify_checkpoint(folder)
    for problem in problems:
        print(problem)
    if not problems:
        print(
            f"{folder}: intact, {checked} files match the SHA-256 recorded when they were written"
            if checked
            else f"{folder}: no SHA-256 recorded (written before checkpoints recorded them), nothing to check"
        )
    return EXIT_CORRUPT if problems else 0


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


def _study_names(names: tuple[str, ...], known: Collection[str], what: str) -> tuple[str, ...]:
    """`names` when each is one of `known` (a `mfr-sae study` option's comma-separated list), else the error."""
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"study: unknown {what} {unknown[0]!r}; choose from {', '.join(known)}")
    return names


def _listed(text: str) -> tuple[str, ...]:
    """A comma-separated option's names; none when it is empty."""
    return tuple(text.split(",")) if text else ()


def run_study(args: argparse.Namespace) -> int:
    from mfr_sae.study import study
    from mfr_sae.study_catalogue import ARCHITECTURES, CANDIDATES, DATASETS, SPLIT_WORDS, TOPK

    counts = {
        "--replicates": args.replicates,
        "--large-replicates": args.large_replicates,
        "--tune-replicates": args.tune_replicates,
    }
    for option, count in counts.items():
        if count < 2:
            raise ConfigError(f"{option} {count}: a paired test needs at least 2 replicates")
    datasets = _study_names(tuple(args.data.split(",")), DATASETS, "dataset")
    tune_on = _study_names(tuple(args.tune_on.split(",")), DATASETS, "dataset")
    candidates = _study_names(_listed(args.candidates), CANDIDATES, "candidate")
    architectures = _study_names(_listed(args.architectures), (TOPK, *ARCHITECTURES), "architecture")
    if not architectures:
        raise ConfigError("--architectures is empty: name at least one (topk, the study's own)")
    if args.judge_on == "test" and candidates:
        raise ConfigError("--candidates with --judge-on test: the test split tunes nothing, it judges the defaults")
    summary = study(
        args.out,
        args.quick,
        args.replicates,
        datasets,
        progress=not args.no_progress,
        tune_replicates=args.tune_replicates,
        tune_on=tune_on,
        large_replicates=args.large_replicates,
        candidates=candidates,
        architectures=architectures,
        judge_on=args.judge_on,
    )
    if summary["tuned"]:
        print(f"chosen on the tuning split ({args.tune_on}): {summary['chosen'] or 'none'}")
    else:
        print("test split: nothing tuned or chosen; the defaults of mfr.* judged once")
    for name, data in summary["datasets"].items():
        print(
            f"{SPLIT_WORDS[args.judge_on]} {name}: "
            + (
                f"{data['best']} beats the baseline"
                if data["best"]
                else "no MFR setting beat the baseline on MCC without losing FVU"
            )
        )
    print(f"report: {args.out / 'report.md'}")
    return 0


def run_study_lm(args: argparse.Namespace) -> int:
    from mfr_sae.study_lm import FULL_TOKENS, QUICK_TOKENS, study_lm
    from mfr_sae.study_lm_report import verdict

    if args.seeds < 2:
        raise ConfigError(f"--seeds {args.seeds}: a paired comparison needs at least 2 seeds")
    tokens = args.tokens or (QUICK_TOKENS if args.quick else FULL_TOKENS)
    summary = study_lm(
        args.out,
        args.model,
        args.text,
        args.hook,
        tokens,
        args.cache_tokens,
        args.seeds,
        context=args.context,
        progress=not args.no_progress,
        extra=args.overrides,
        evaluation=evaluation_options(args) if args.evaluate else None,
    )
    print("\n".join(verdict(summary)))
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
        if results.get("dead_frac_note"):  # why a dead_frac reads n/a
            print(f"dead_frac n/a: {results['dead_frac_note']}")
        print(f"\nrun folder: {out} (results.json, metrics.jsonl, checkpoint/)")
        if results.get("collapse_note"):
            print(f"warning: {results['collapse_note']}", file=sys.stderr)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from mfr_sae.evaluate import EVALUATION_FILE, EVALUATION_REPORT, evaluate_run

    evaluate_run(args.run, evaluation_options(args))
    print(f"evaluation: {args.run / EVALUATION_FILE}, report: {args.run / EVALUATION_REPORT}")
    return 0


TRAINING_COMMANDS = {"train", "reproduce", "study", "study-lm"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in TRAINING_COMMANDS:  # this process is ours: training on a CPU keeps its gradient buffers
        keep_freed_cpu_memory()  # (cpu_memory.py); elsewhere the heap it keeps only grows (browse: 2.3x the peak)
    try:
        commands = {
            "train": run_train,
            "reproduce": run_reproduce,
            "compare": run_compare,
            "cache": run_cache,
            "study": run_study,
            "study-lm": run_study_lm,
            "verify": run_verify,
            "browse": run_browse,
            "evaluate": run_evaluate,
        }
        code = commands[args.command](args)
    except USER_ERRORS as err:
        print(f"mfr-sae: error: {err}", file=sys.stderr)
        code = 2
    except OSError as err:  # a full disk, a quota, a read-only file system, no permission: the user's to fix
        line = refused_write(err)
        if line is None:
            raise  # any other: a bug, its traceback the report
        print(f"mfr-sae: error: {line}", file=sys.stderr)
        code = 2
    except Interrupted as err:  # Ctrl-C in training; the message says how to continue from the last checkpoint
        print(f"mfr-sae: {err}", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("mfr-sae: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    if process_group.close():  # under torchrun: leave without the interpreter's teardown (see close)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
