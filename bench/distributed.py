"""Throughput of one ensemble on 1 and 2 processes (torchrun, gloo on CPU, NCCL on CUDA), in one run.

At d=768, h=3072, batch 500, k=12, N=5 (the paper's GPT-2 scale, synthetic vectors), this launches
`torchrun --standalone --nproc_per_node R` for each R in --procs, times the baseline step and the MFR
step (match_every=50, and the default 1: matching every step, the pairs split between ranks) on every
rank, and prints tokens/s, the speed-up over R=1, and the bytes a rank receives per step (the mean over
ranks; as a fraction of the ensemble's parameter bytes). On CPU the cores are shared: each process gets
cores / R threads.

    python bench/distributed.py [--procs 1,2] [--steps 10] [--autocast]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
STEPS = [("baseline", None), ("MFR m=50", 50), ("MFR m=1", 1)]  # (name, mfr.match_every)


def worker(steps: int, autocast: bool) -> None:
    """One rank: time both steps; rank 0 prints one JSON line."""
    sys.path.insert(0, str(HERE))
    from step import BATCH, trainer  # bench/step.py

    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(max(1, int(os.environ["BENCH_CORES"]) // world))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"world": world, "threads": torch.get_num_threads()}
    for name, every in STEPS:
        extra = [] if every is None else ["mfr.enabled=true", "mfr.reinit_window=0", f"mfr.match_every={every}"]
        run = trainer(device, extra + ["train.autocast=true"] * autocast)
        x = next(run.source.batches(BATCH)).to(run.device)
        for _ in range(2):
            run.train_step(x)
        run.shard.barrier()
        received = run.shard.received_bytes
        start = time.perf_counter()
        n = max(steps, every or 1)  # MFR: a whole re-matching period
        for _ in range(n):
            run.train_step(x)
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        run.shard.barrier()
        seconds, received = (time.perf_counter() - start) / n, (run.shard.received_bytes - received) / n
        received = sum(run.shard.gather_objects(received)) / world  # the mean over ranks
        params = sum(p.numel() * p.element_size() for p in run._gathered_ensemble().parameters())
        result[name] = {"seconds": seconds, "received_bytes": received, "param_bytes": params}
    if run.shard.is_main:
        print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--autocast", action="store_true", help="bf16 products, decoders sent in bf16")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"machine: {os.uname().machine}, {cores} cores, torch {torch.__version__}, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (gloo)'}")
    rows = {}
    for procs in map(int, args.procs.split(",")):
        env = {**os.environ, "BENCH_CORES": str(cores)}
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={procs}", __file__, "--worker", str(args.steps),
                               str(int(args.autocast))],
                              capture_output=True, text=True, env=env)
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            print(f"R={procs}: failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:200]}")
            continue
        rows[procs] = json.loads(line[0][7:])
    print(f"\n{'':10s} {'R':>2s} {'threads/proc':>12s} {'ms/step':>8s} {'tokens/s':>9s} {'vs R=1':>7s} "
          f"{'MiB recv/step':>12s} {'of params':>9s}")
    for name, _ in STEPS:
        for procs, row in rows.items():
            r = row[name]
            base = rows.get(1, row)[name]["seconds"]
            print(f"{name:10s} {procs:2d} {row['threads']:12d} {1000 * r['seconds']:8.1f} {500 / r['seconds']:9.0f} "
                  f"{base / r['seconds']:7.2f} {r['received_bytes'] / 2**20:12.2f} "
                  f"{r['received_bytes'] / r['param_bytes']:9.1%}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), bool(int(sys.argv[3])))
    else:
        main()
