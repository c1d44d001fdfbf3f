"""Throughput of the mfr-sae ensemble step against its peers (SAELens, sparsify), in one run.

At d=768, h=3072, batch 500, k=12, N=5 members, on one machine and one batch of synthetic vectors,
this times one "ensemble step" (all 5 SAEs each take one training step on the batch) for:
- the floor: the encoder product alone, the faster of two ways to write it (as in bench/step.py);
- mfr-sae: the baseline step and the paper's MFR step (`mfr.reinit_window=0`) at `mfr.match_every=50`
  on the fixed batch, and exact (`match_every=1`, certified matching) timed after `--warm` steps of
  training on fresh batches, where the share of rows re-matched a step is what training sees; and
  the defaults' MFR (`hungarian`, every 10 steps) timed the same way (give --steps as a multiple of 10:
  the time is then averaged over whole re-matching cycles);
- SAELens (`sae-lens`): 5 `TopKTrainingSAE`s trained one after another, each by its own
  `SAETrainer.step` (`training_forward_pass`: MSE + TopK aux loss, backward, grad-norm clip, Adam
  lr 1e-3, lr scheduler); the time is the sum over the 5;
- sparsify (`eai-sparsify`): 5 `SparseCoder`s (TopK) one after another, each step as its `Trainer`
  does it with `optimizer="adam"` (unit-norm decoder, FVU loss, backward, decoder-parallel gradient
  removed, Adam lr 1e-3, warmup scheduler); the time is the sum over the 5.
Each dtype in `--dtypes` (fp32, bf16 autocast where the tool allows it) is timed; what a tool does not
allow is printed with the reason. Each peer runs in its own virtual environment under `--venvs`
(made on first use: `python -m venv`, then `pip install torch==<this torch> <peer>`; about 2 minutes
and 2 GB each), as a subprocess of this script (`peers.py --worker NAME SPEC_JSON`).

    python bench/peers.py [--steps 10] [--warm 75] [--device cpu|cuda] [--dtypes fp32,bf16] [--venvs bench/.venvs]
                          [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from timing import timed  # bench/timing.py (no mfr_sae: workers run in the peers' venvs)

D, H, BATCH, K, N = 768, 3072, 500, 12, 5
LR = 1e-3
HERE = Path(__file__).resolve().parent
PEERS = {"saelens": ("sae-lens", "sae_lens"), "sparsify": ("eai-sparsify", "sparsify")}  # name: (pip, module)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------- workers (run inside a peer's venv)


def saelens_steps(x: torch.Tensor, seed: int, dtype: str) -> Callable[[], Any]:
    """One SAELens TopK SAE and its trainer; returns its training step on x."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=H, k=K, device=str(x.device)))
    cfg = SAETrainerConfig(
        total_training_samples=10**9,
        train_batch_size_samples=BATCH,
        lr=LR,
        lr_end=LR / 10,
        device=str(x.device),
        autocast=dtype == "bf16",
    )  # bf16: torch.autocast
    trainer = SAETrainer(cfg, sae, data_provider=iter(()))

    def step() -> None:  # what SAETrainer.fit does per batch, less logging and checkpoints
        trainer.maybe_reset_sparsity()
        trainer.step(x)
        trainer.n_training_steps += 1

    return step


def sparsify_steps(x: torch.Tensor, seed: int, dtype: str) -> Callable[[], Any]:
    """One sparsify SparseCoder; returns its training step on x as sparsify's Trainer does it."""
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    if dtype == "bf16" and x.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError("this GPU has no bf16")
    torch.manual_seed(seed)
    sae = SparseCoder(D, SparseCoderConfig(num_latents=H, k=K), x.device, dtype=torch.float32)
    sae.b_dec.data = x.mean(0)  # the Trainer's first-step initialisation
    opt = torch.optim.Adam(sae.parameters(), lr=LR)  # Trainer, optimizer="adam" (no bitsandbytes)
    sched = get_linear_schedule_with_warmup(opt, 1000, 10**6)
    did_fire = torch.zeros(H, dtype=torch.bool, device=x.device)
    # SparseCoder.forward carries @torch.autocast("cuda", bf16): on CUDA fp32 call the undecorated one,
    # on CPU bf16 wrap it in CPU autocast (sparsify itself only autocasts on CUDA).
    forward = sae.forward.__wrapped__ if dtype == "fp32" and x.device.type == "cuda" else SparseCoder.forward
    cast = torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16" and x.device.type == "cpu")

    def step() -> None:
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        with cast:
            out = forward(sae, x, x, dead_mask=None, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        (out.fvu + out.multi_topk_fvu / 8).backward()  # auxk_alpha is 0 by default
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()

    return step


def worker(name: str, spec: dict[str, Any]) -> None:
    """Time N SAEs of one peer one after another; print one JSON line."""
    from importlib.metadata import version

    import numpy as np

    device = torch.device(spec["device"])
    x = torch.from_numpy(np.load(spec["batch"])).to(device)
    make = {"saelens": saelens_steps, "sparsify": sparsify_steps}[name]
    result: dict[str, Any] = {"version": version(PEERS[name][0]), "torch": torch.__version__}
    for dtype in spec["dtypes"]:
        try:
            seconds = [timed(make(x, spec["seed"] + i, dtype), spec["steps"], device) for i in range(N)]
            result[dtype] = {"seconds": sum(seconds), "per_sae": seconds}
        except Exception as err:  # a dtype the tool does not allow: say why
            result[dtype] = {"error": f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"}
    print(json.dumps(result))


# ---------------------------------------------------------------- main (this environment)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip() and "WARNING: Location" not in line]
    return lines[-1].strip()[:300] if lines else "(no output)"


def venv_python(root: Path, name: str) -> Path:
    """The peer's venv python, made (and its peer installed) when missing or broken; raises with why."""
    package, module = PEERS[name]
    folder = root / name
    python = folder / "bin" / "python"
    check = subprocess.run([python, "-c", f"import torch, {module}"], capture_output=True) if python.exists() else None
    if check is not None and check.returncode == 0:
        return python
    root.mkdir(parents=True, exist_ok=True)
    (root / ".gitignore").write_text("*\n")  # keep the venvs out of git
    torch_pin = "torch==" + torch.__version__.split("+")[0]
    print(f"installing {package} into {folder} (python -m venv; pip install {torch_pin} {package}) ...", flush=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "venv", "--clear", folder], capture_output=True, text=True)
    if done.returncode == 0:
        (folder / "constraints.txt").write_text(torch_pin + "\n")  # pip must not swap torch for another version
        done = subprocess.run(
            [python, "-m", "pip", "install", "-q", "-c", folder / "constraints.txt", torch_pin, package],
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        raise RuntimeError(f"install failed: {last_line(done.stderr + done.stdout)}")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
    print(f"  installed in {time.perf_counter() - start:.0f} s, venv {size / 2**30:.1f} GiB", flush=True)
    return python


def run_peer(name: str, root: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """The worker's JSON for one peer, or {"error": why}."""
    try:
        python = venv_python(root, name)
    except Exception as err:
        return {"error": str(err)}
    print(f"timing {PEERS[name][0]} ({N} SAEs one after another) ...", flush=True)
    # the same glibc setting as mfr-sae's trainer (cpu_memory.keep_freed_cpu_memory), through its environment variables
    env = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
    done = subprocess.run(
        [python, __file__, "--worker", name, json.dumps(spec)], capture_output=True, text=True, env=env
    )
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": f"worker failed: {last_line(done.stderr + done.stdout)}"}


def bf16_overrides() -> list[str] | None:
    """The config overrides that turn on bf16 in this build of mfr-sae, or None when it has none."""
    from mfr_sae.config import ConfigError, TrainConfig, load_config

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in (("autocast", "bf16"), ("autocast", "true"), ("dtype", "bf16"), ("dtype", "bfloat16")):
        if key in fields:
            try:
                load_config(None, [f"train.{key}={value}"])
                return [f"train.{key}={value}"]
            except ConfigError:
                continue
    return None


def trained_step(trainer: Any, warm: int, steps: int, device: torch.device) -> tuple[float, float | None]:
    """Seconds per step of a trainer over `steps` steps after `warm` steps of training, each on a fresh batch
    of its source, and the mean share of rows re-matched a step (its log's match_rematched_frac; None
    without certified matching)."""
    batches = trainer.source.batches(BATCH)
    for _ in range(warm):
        trainer.train_step(next(batches).to(device))
    fresh = [next(batches).to(device) for _ in range(steps + 2)]
    shares: list[float] = []

    def step() -> None:
        trainer.train_step(fresh.pop())
        if trainer.mfr.matching.certified is not None:
            shares.append(trainer.mfr.matching.certified.rematched_frac)

    seconds = timed(step, steps, device)
    return seconds, sum(shares[2:]) / steps if shares else None


def against_goal(ratio: float, sense: str, goal: float) -> str:
    """The ratio and whether it meets the goal, judged before rounding (2.995 prints 3.00 but misses 3)."""
    met = ratio >= goal if sense == ">=" else ratio <= goal
    return f"{ratio:.3f} (goal {sense} {goal}: {'met' if met else 'missed'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per SAE (after 2 warm-up steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--venvs", type=Path, default=HERE / ".venvs", help="folder of the peers' venvs")
    parser.add_argument("--peers", default="saelens,sparsify", help="comma-separated; empty: none")
    parser.add_argument("--json", type=Path, help="also save the numbers here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm", type=int, default=75, help="training steps before the exact MFR step is timed")
    args = parser.parse_args()
    dtypes = ["fp32"] + [d for d in args.dtypes.split(",") if d and d != "fp32"]  # fp32 always
    if unknown := set(dtypes) - set(DTYPES):
        parser.error(f"unknown dtype(s): {', '.join(sorted(unknown))}")

    sys.path.insert(0, str(HERE))
    from step import PAPER_MFR, trainer  # bench/step.py

    device = torch.device(args.device)
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"device {device}{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}"
    )
    print(f"setting: d={D}, h={H}, batch {BATCH}, k={K}, N={N}, {args.steps} timed steps, dtypes {', '.join(dtypes)}\n")

    base = trainer(args.device, [])
    x = next(base.source.batches(BATCH)).to(device)
    notes: list[str] = []
    seconds: dict[str, dict[str, float]] = {d: {} for d in dtypes}  # dtype -> row -> s per ensemble step
    bf16 = bf16_overrides() if "bf16" in dtypes else None
    if "bf16" in dtypes and bf16 is None:
        notes.append("mfr-sae bf16: not available in this build")
        print(notes[-1])
    for dtype in dtypes:
        w, b = base.ensemble.W_enc.detach().to(DTYPES[dtype]), base.ensemble.b_enc.detach().to(DTYPES[dtype])
        xd = x.to(DTYPES[dtype])
        seconds[dtype]["floor"] = min(  # the faster of two ways to write the encoder product (bench/step.py)
            timed(lambda: torch.baddbmm(b.unsqueeze(1), xd.expand(N, *x.shape), w.transpose(1, 2)), args.steps, device),
            timed(lambda: torch.addmm(b.reshape(-1), xd, w.reshape(-1, D).t()), args.steps, device),
        )
        extra = [] if dtype == "fp32" else bf16
        if extra is None:
            continue
        print(f"timing mfr-sae {dtype} ...", flush=True)
        ours = trainer(args.device, extra)
        seconds[dtype]["mfr-sae baseline"] = timed(lambda: ours.train_step(x), args.steps, device)
        for every in (50, 1):
            mfr = trainer(
                args.device, extra + [*PAPER_MFR, "mfr.enabled=true", "mfr.reinit_window=0", f"mfr.match_every={every}"]
            )
            if every == 1:  # exact: certified matching, timed in training, as bench/certified.py times it
                seconds[dtype]["mfr-sae MFR exact"], share = trained_step(mfr, args.warm, args.steps, device)
                notes.append(f"mfr-sae MFR exact {dtype}: steps {args.warm}+, {share:.1%} of rows re-matched a step")
            else:
                steps = max(args.steps, every)
                seconds[dtype][f"mfr-sae MFR m={every}"] = timed(lambda: mfr.train_step(x), steps, device)
        defaults = trainer(args.device, extra + ["mfr.enabled=true", "mfr.reinit_window=0"])  # hungarian, m=10
        seconds[dtype]["mfr-sae MFR defaults"], _ = trained_step(defaults, args.warm, args.steps, device)
        notes.append(f"mfr-sae MFR defaults {dtype}: steps {args.warm + 2}-{args.warm + args.steps + 1} of training")

    batch_file = Path(tempfile.mkdtemp()) / "batch.npy"
    import numpy as np

    np.save(batch_file, x.float().cpu().numpy())
    spec = {"device": args.device, "dtypes": dtypes, "steps": args.steps, "seed": args.seed, "batch": str(batch_file)}
    peers: dict[str, dict[str, Any]] = {}
    for name in filter(None, args.peers.split(",")):
        peers[name] = result = run_peer(name, args.venvs, spec)
        label = f"{PEERS[name][0]} {result.get('version', '')}".strip()
        if "error" in result:
            notes.append(f"{label}: cannot run: {result['error']}")
        for dtype in dtypes:
            if "seconds" in result.get(dtype, {}):
                seconds[dtype][f"{label} {N} sequential"] = result[dtype]["seconds"]
            elif "error" in result.get(dtype, {}):
                notes.append(f"{label} {dtype}: not run: {result[dtype]['error']}")

    print(f"\n{'':32s} {'dtype':>5s} {'ms/step':>9s} {'tokens/s':>10s} {'x floor':>8s}")
    for dtype in dtypes:
        floor = seconds[dtype]["floor"]
        for name, s in seconds[dtype].items():
            print(
                f"{'encoder product (floor)' if name == 'floor' else name:32s} {dtype:>5s} "
                f"{1000 * s:9.1f} {BATCH / s:10.0f} {s / floor:8.2f}"
            )
    print("(ms/step: one step of all 5 SAEs on the batch of 500; x floor: against the floor of the same dtype)")
    for note in notes:
        print("note:", note)
    print()
    for dtype in dtypes:
        row = seconds[dtype]
        exact, base_s = row.get("mfr-sae MFR exact"), row.get("mfr-sae baseline")
        if exact is None:
            continue
        lens = next((s for n, s in row.items() if n.startswith("sae-lens")), None)
        spars = next((s for n, s in row.items() if n.startswith("eai-sparsify")), None)
        print(
            f"[{dtype}] exact MFR step throughput / SAELens sequential = {against_goal(lens / exact, '>=', 3)}"
            if lens
            else f"[{dtype}] MFR / SAELens: SAELens not timed"
        )
        if spars:
            print(f"[{dtype}] exact MFR step throughput / sparsify sequential = {spars / exact:.2f}")
        print(f"[{dtype}] exact MFR / baseline = {against_goal(exact / base_s, '<=', 1.2)}")
        print(f"[{dtype}] MFR match_every=50 / baseline = {row['mfr-sae MFR m=50'] / base_s:.3f}")
        defaults = row["mfr-sae MFR defaults"]
        print(f"[{dtype}] MFR defaults (hungarian, every 10 steps) / baseline = {defaults / base_s:.3f}")
        if lens:
            print(f"[{dtype}] MFR defaults step throughput / SAELens sequential = {lens / defaults:.2f}")
        print(f"[{dtype}] baseline / floor = {against_goal(base_s / row['floor'], '<=', 2)}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "setting": {
                        "d": D,
                        "h": H,
                        "batch": BATCH,
                        "k": K,
                        "n": N,
                        "steps": args.steps,
                        "device": str(device),
                        "torch": torch.__version__,
                        "machine": platform.machine(),
                    },
                    "seconds_per_step": seconds,
                    "peers": peers,
                    "notes": notes,
                },
                indent=1,
            )
        )
        print(f"\nsaved {args.json}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], json.loads(sys.argv[3]))
    else:
        main()
