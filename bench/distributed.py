"""Throughput and memory of one ensemble on 1 and more processes (torchrun, gloo on CPU, NCCL on CUDA).

At d=768, h=3072, batch 500, k=12, N=5 (the paper's GPT-2 scale, synthetic vectors), this launches
`torchrun --standalone --nproc_per_node R` for each R in --procs, times the baseline step and the MFR
step (match_every=50, and the default 1: matching every step, the pairs split between ranks) on every
rank, and prints tokens/s, the speed-up over R=1, and the bytes a rank receives per step (the mean over
ranks; as a fraction of the ensemble's parameter bytes). On CPU the cores are shared: each process gets
cores / R threads.

--memory: N=8 members instead, one launch per R and step (baseline; MFR re-matching every step), 3
steps each; prints the peak memory of the largest rank (peak resident set on CPU, peak allocated on
CUDA), the MFR step's extra over the baseline's, and that extra in decoders of one member (h d fp32).

    python bench/distributed.py [--procs 1,2] [--steps 10] [--autocast]
    python bench/distributed.py --memory [--procs 1,2,4,8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
STEPS = [("baseline", None), ("MFR m=50", 50), ("MFR m=1", 1)]  # (name, mfr.match_every)
MEMORY_MEMBERS = 8


def worker(spec: dict) -> None:
    """One rank: time the steps (or, with spec["memory"], measure one step's peak memory); rank 0 prints
    one JSON line."""
    sys.path.insert(0, str(HERE))
    from step import BATCH, PAPER_MFR, trainer  # bench/step.py

    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(max(1, int(os.environ["BENCH_CORES"]) // world))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"world": world, "threads": torch.get_num_threads()}
    steps = [s for s in STEPS if s[0] == spec["memory"]] if spec["memory"] else STEPS
    for name, every in steps:
        extra = (
            [] if every is None else [*PAPER_MFR, "mfr.enabled=true", "mfr.reinit_window=0", f"mfr.match_every={every}"]
        )
        extra += ["train.autocast=true"] * spec["autocast"] + [f"sae.n_members={MEMORY_MEMBERS}"] * bool(spec["memory"])
        run = trainer(device, extra)
        x = next(run.source.batches(BATCH)).to(run.device)
        if spec["memory"]:
            result[name] = _peak_memory(run, x)
            continue
        for _ in range(2):
            run.train_step(x)
        run.shard.barrier()
        received = run.shard.received_bytes
        start = time.perf_counter()
        n = max(spec["steps"], every or 1)  # MFR: a whole re-matching period
        for _ in range(n):
            run.train_step(x)
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        run.shard.barrier()
        seconds, received = (time.perf_counter() - start) / n, (run.shard.received_bytes - received) / n
        received = sum(run.shard.gather_objects(received)) / world  # the mean over ranks
        params = sum(run.shard.gather_objects(sum(p.numel() * p.element_size() for p in run.ensemble.parameters())))
        result[name] = {"seconds": seconds, "received_bytes": received, "param_bytes": params}
    if run.shard.is_main:
        print("RESULT " + json.dumps(result), flush=True)


def _peak_memory(run, x: torch.Tensor) -> dict[str, float]:
    """The peak memory of the largest rank over 3 training steps (CPU: the process's peak resident set,
    which includes torch itself; CUDA: peak allocated), and one member's decoder bytes."""
    for _ in range(3):
        run.train_step(x)
    if run.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    decoder = run.ensemble.decoder_weight
    return {
        "peak_bytes": max(run.shard.gather_objects(peak)),
        "member_decoder_bytes": decoder[0].numel() * decoder.element_size(),
    }


def _launch(procs: int, spec: dict) -> dict | None:
    """One torchrun of `procs` workers: rank 0's result, or None (said why)."""
    env = {**os.environ, "BENCH_CORES": str(os.cpu_count() or 1)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
            __file__,
            "--worker",
            json.dumps(spec),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not line:
        print(f"R={procs}: failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:200]}")
        return None
    return json.loads(line[0][7:])


def memory(procs: list[int], autocast: bool) -> None:
    print(
        f"\n{'R':>2s} {'members/rank':>12s} {'baseline MiB':>12s} {'MFR MiB':>8s} {'MFR extra MiB':>13s} "
        f"{'in decoders':>11s}"
    )
    for r in procs:
        base, mfr = (_launch(r, {"steps": 3, "autocast": autocast, "memory": name}) for name in ("baseline", "MFR m=1"))
        if base and mfr:
            b, m = base["baseline"], mfr["MFR m=1"]
            extra = m["peak_bytes"] - b["peak_bytes"]
            print(
                f"{r:2d} {MEMORY_MEMBERS / r:12.1f} {b['peak_bytes'] / 2**20:12.1f} {m['peak_bytes'] / 2**20:8.1f} "
                f"{extra / 2**20:13.1f} {extra / m['member_decoder_bytes']:11.1f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", default=None, help="comma-separated process counts (default 1,2; --memory: 1,2,4,8)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--autocast", action="store_true", help="bf16 products, decoders sent in bf16")
    parser.add_argument("--memory", action="store_true", help="peak memory per rank instead of speed")
    args = parser.parse_args()
    procs = [int(p) for p in (args.procs or ("1,2,4,8" if args.memory else "1,2")).split(",")]
    print(
        f"machine: {os.uname().machine}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (gloo)'}"
    )
    if args.memory:
        return memory(procs, args.autocast)
    rows = {
        r: row for r in procs if (row := _launch(r, {"steps": args.steps, "autocast": args.autocast, "memory": None}))
    }
    print(
        f"\n{'':10s} {'R':>2s} {'threads/proc':>12s} {'ms/step':>8s} {'tokens/s':>9s} {'vs R=1':>7s} "
        f"{'MiB recv/step':>12s} {'of params':>9s}"
    )
    for name, _ in STEPS:
        for procs, row in rows.items():
            r = row[name]
            base = rows.get(1, row)[name]["seconds"]
            print(
                f"{name:10s} {procs:2d} {row['threads']:12d} {1000 * r['seconds']:8.1f} {500 / r['seconds']:9.0f} "
                f"{base / r['seconds']:7.2f} {r['received_bytes'] / 2**20:12.2f} "
                f"{r['received_bytes'] / r['param_bytes']:9.1%}"
            )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
    else:
        main()
