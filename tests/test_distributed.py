"""One ensemble across processes: 2 local gloo processes (torchrun) against one process."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mfr_sae import load
from mfr_sae.config import PAPER_MFR, ConfigError
from mfr_sae.distributed import Shard
from mfr_sae.matching import NO_MATCH
from mfr_sae.trainer_state import load_trainer_state

SMALL = [
    *PAPER_MFR,
    "data.d=32",
    "data.n_features=64",
    "data.n_groups=4",
    "data.n_active=3",
    "sae.d_sae=64",
    "sae.n_members=3",
    "sae.k=[4, 3, 2]",
    "train.batch_size=200",
    "train.n_samples=16000",
    "train.checkpoint_every=20",
    "eval.n_samples=1000",
    "mfr.reinit_samples=400",
    # member 2 (k=2, on rank 1) is re-initialised twice early on, its M well above the threshold and
    # the others' well below: decisions far from the threshold, so that float noise between 1 and 2
    # processes cannot flip them
    "mfr.reinit_threshold=0.6",
    "mfr.reinit_max=2",
    "mfr.reinit_window=20",
]


def test_members_are_split_in_contiguous_shards_of_near_equal_size():
    shards = [Shard(5, rank, 2) for rank in range(2)]
    assert [s.members for s in shards] == [[0, 1, 2], [3, 4]]
    assert [Shard(7, r, 3).members for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    full = torch.arange(5 * 2).view(5, 2)
    assert torch.equal(shards[1].local(full), full[3:]) and torch.equal(Shard(5).gather(full), full)
    with pytest.raises(ConfigError, match="3 processes for sae.n_members=2: use at most 2 processes, or a multiple"):
        Shard(2, 0, 3)
    replicas = [Shard(2, rank, 4) for rank in range(4)]  # data parallel: 2 processes per member
    assert [s.members for s in replicas] == [[0], [0], [1], [1]] and [s.replica for s in replicas] == [0, 1, 0, 1]
    assert [s.batch_rows(7) for s in replicas] == [slice(0, 3), slice(3, 7)] * 2


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # each process on one core: 2 processes on 2 cores


def _set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _train(
    out: Path, overrides: list[str], processes: int = 1, resume: bool = False, wait: bool = True
) -> subprocess.Popen | subprocess.CompletedProcess:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        if processes > 1
        else [sys.executable]
    )
    args = ["--resume", str(out)] if resume else ["--out", str(out)] + _set_args(overrides)
    command = launcher + ["-m", "mfr_sae", "train", "--no-progress", *args]
    env = ONE_THREAD
    if not wait:
        return subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
        )
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, _worker_errors(done.stderr)
    return done


def _worker_errors(stderr: str) -> str:
    """What the workers said before torchrun's summary (without torchrun's warnings)."""
    return "\n".join(line for line in stderr.splitlines() if not line.startswith(("W1", "*****")))[:3000]


def _assert_same_weights(a: Path, b: Path, label: str) -> None:
    """Every weight of run b within 1e-4 (max abs) of run a; the difference is printed (pytest -s)."""
    one, two = load(a), load(b)
    difference = max((p - getattr(two, name)).abs().max().item() for name, p in one.named_parameters())
    print(f"{label}: max difference {difference}")
    assert difference <= 1e-4, (label, difference)


def _assert_same_log(a: Path, b: Path) -> None:
    """metrics.jsonl of run b has the lines of run a: the same steps and keys, numbers within 1e-4 (but
    match_rematched_frac, a share of each rank's own pairs)."""
    one, two = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (a, b))
    keys = lambda log: [sorted(set(r) - {"match_rematched_frac"}) for r in log]  # noqa: E731
    assert keys(two) == keys(one)
    for r1, r2 in zip(one, two):
        for key in ("loss", "mse", "l0", "dead_frac", "penalty", "pairwise_mmcs", "reinit_metric"):
            if key in r1:  # (a member's dead_frac is None until it is measured)
                assert _none_as_nan(r2[key]) == pytest.approx(_none_as_nan(r1[key]), rel=1e-4, abs=1e-6, nan_ok=True), (
                    r1["step"],
                    key,
                )


def _none_as_nan(value):
    """A logged number or list of numbers, None as nan (which pytest.approx compares with nan_ok)."""
    if isinstance(value, list):
        return [float("nan") if number is None else number for number in value]
    return float("nan") if value is None else value


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _assert_same_decisions(a: Path, b: Path) -> None:
    """The same reinitialisations (step, member, attempt) and the same beta, up to float noise (the
    penalty's sums run in a different order when the decoders arrive shard by shard)."""
    one, two = _results(a), _results(b)
    assert [(e["step"], e["member"], e["attempt"]) for e in one["reinit_events"]] == [
        (e["step"], e["member"], e["attempt"]) for e in two["reinit_events"]
    ]
    assert [e["metric"] for e in two["reinit_events"]] == pytest.approx(
        [e["metric"] for e in one["reinit_events"]], rel=1e-5
    )
    assert two["beta"] == (None if one["beta"] is None else pytest.approx(one["beta"], rel=1e-5))


@pytest.mark.parametrize("mfr, autocast", [(False, False), (True, False), (True, True)])
def test_two_processes_end_with_the_weights_of_one(tmp_path, mfr, autocast):
    """Under autocast the decoder rows travel (and are matched) in bf16, in one process as on two."""
    overrides = SMALL + [f"mfr.enabled={str(mfr).lower()}", f"train.autocast={str(autocast).lower()}"]
    _train(tmp_path / "one", overrides)
    _train(tmp_path / "two", overrides, processes=2)
    _assert_same_weights(tmp_path / "one", tmp_path / "two", "1 vs 2 processes")
    _assert_same_log(tmp_path / "one", tmp_path / "two")
    _assert_same_decisions(tmp_path / "one", tmp_path / "two")
    if mfr:  # re-initialised on rank 1, decided with the firing counts of both ranks
        assert [e["member"] for e in _results(tmp_path / "one")["reinit_events"]] == [2, 2]
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoint").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "checkpoint").iterdir()
    )


def test_batchtopk_members_on_two_processes_end_with_the_weights_and_thresholds_of_one(tmp_path):
    """Each rank estimates its own members' thresholds; the checkpoint gathers them with the weights."""
    overrides = SMALL + ["mfr.enabled=true", "sae.architecture=batchtopk"]
    _train(tmp_path / "one", overrides)
    _train(tmp_path / "two", overrides, processes=2)
    _assert_same_weights(tmp_path / "one", tmp_path / "two", "1 vs 2 processes, batchtopk")
    one, two = load(tmp_path / "one").threshold, load(tmp_path / "two").threshold
    assert (one > 0).all() and torch.allclose(one, two, rtol=1e-4)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_rendezvous_and_train_as_one_process(tmp_path):
    """torchrun --nnodes 2: two launchers (here on one machine) meet at a c10d rendezvous endpoint."""
    overrides = SMALL + ["mfr.enabled=true"]
    _train(tmp_path / "one", overrides)
    endpoint = f"127.0.0.1:{_free_port()}"
    args = _set_args(overrides)
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={node}",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint={endpoint}",
                "--rdzv_id=test",
                "-m",
                "mfr_sae",
                "train",
                "--no-progress",
                "--out",
                str(tmp_path / "two_nodes"),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ONE_THREAD,
        )
        for node in (0, 1)
    ]
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, _worker_errors(stderr)
    _assert_same_weights(tmp_path / "one", tmp_path / "two_nodes", "1 process vs 2 nodes")


def test_data_parallel_when_there_are_more_processes_than_members(tmp_path):
    """4 processes for 2 members: each member splits its batch over 2 processes, gradients summed."""
    overrides = [o for o in SMALL if not o.startswith(("sae.", "train.n_samples", "mfr.reinit"))] + [
        "sae.d_sae=64",
        "sae.n_members=2",
        "sae.k=[3, 4]",
        "train.n_samples=6000",
        "mfr.enabled=true",
        "mfr.reinit_window=0",
    ]  # float sums now differ in order: no threshold decision to flip
    _train(tmp_path / "one", overrides)
    _train(tmp_path / "four", overrides, processes=4)
    _assert_same_weights(tmp_path / "one", tmp_path / "four", "1 vs 4 processes (data parallel)")
    one, four = _results(tmp_path / "one"), _results(tmp_path / "four")
    assert [m["mse"] for m in four["members"]] == pytest.approx([m["mse"] for m in one["members"]], rel=1e-4)


@pytest.mark.parametrize(
    "mmcs, extra",
    [
        ("max", []),
        ("hungarian", []),
        # the twin guard, and pairs of idle latents left out: each rank knows every member's idle latents
        ("mnn_hungarian", ["mfr.twin_guard=0.3", "mfr.idle_window=100", "mfr.idle_to_live=true"]),
        # only unconfirmed latents pulled, towards confirmed ones: each rank knows what every pair confirmed
        ("greedy", ["mfr.confirm_cosine=0.5", "mfr.max_cosine=0.45", "mfr.idle_window=0", "mfr.twin_guard=1"]),
    ],
)
def test_four_uneven_shards_match_and_link_as_one_process(tmp_path, mmcs, extra):
    """5 members on 4 processes (2 + 1 + 1 + 1): the decoders go round the ring in 3 stages, the pairs
    across shards matched by the rank that sees the other first (both at stage 2, half each) and their
    matches sent to the other; re-matching every 3 steps, so that the links also serve between."""
    overrides = [o for o in SMALL if not o.startswith(("sae.n_members", "sae.k", "train.n_samples", "mfr.reinit"))]
    overrides += [
        "sae.n_members=5",
        "sae.k=[4, 3, 2, 3, 4]",
        "train.n_samples=6000",
        "mfr.enabled=true",
        "mfr.reinit_window=0",
        "mfr.match_every=3",
        f"mfr.mmcs={mmcs}",
        *extra,
    ]
    _train(tmp_path / "one", overrides)
    _train(tmp_path / "four", overrides, processes=4)
    _assert_same_weights(tmp_path / "one", tmp_path / "four", f"1 vs 4 processes, 5 members, {mmcs}")
    _assert_same_log(tmp_path / "one", tmp_path / "four")
    one, four = (load_trainer_state(tmp_path / run / "checkpoint")[0]["mfr.matches"] for run in ("one", "four"))
    assert torch.equal(one, four)  # every pair's matches, gathered from the ranks that know them
    assert (one == NO_MATCH).any() == bool(extra)  # the guards left some matches out
    if "mfr.confirm_cosine=0.5" in extra:  # some latents were confirmed, others pulled towards them
        logged = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
        assert 0 < max(line.get("confirmed_frac", 0) for line in logged) < 1


_STREAM_WORKER = """
import json, weakref, torch
from mfr_sae import distributed, process_group, ring
rank, world, _ = process_group.init(torch.device("cpu"), 60)
shard = distributed.Shard(5, rank, world)
local = torch.arange(shard.start, shard.stop, dtype=torch.float32).view(-1, 1, 1).expand(-1, 3, 4).contiguous()
seen, held = [], []
for stage, (members, rows) in enumerate(ring.stream_shards(shard, local)):
    assert torch.equal(rows[:, 0, 0], torch.tensor(list(members), dtype=torch.float32)), (stage, members)
    refs = [ref for ref in held if ref() is not None]
    seen.append([list(members), shard.received_bytes, len(refs)])
    if stage:
        held.append(weakref.ref(rows))
    del rows
print("STREAM", rank, json.dumps(seen), flush=True)
# the penalty itself: when the ring allocates the next shard, no shard the rank took before it is alive
from mfr_sae.config import MFRConfig
from mfr_sae.mfr import MutualRegularizer
passed_on, alive = [], []
pass_on = ring._pass_on
def watched(shard, outgoing, stage):
    alive.append(sum(ref() is not None for ref in passed_on[1:]))  # [0]: the own shard, kept
    passed_on.append(weakref.ref(outgoing))
    return pass_on(shard, outgoing, stage)
ring._pass_on = watched
cfg = MFRConfig(enabled=True, beta=1.0, mmcs="max", match_every=1, max_cosine=0.9, twin_guard=0.9, confirm_cosine=1.0)
regularizer = MutualRegularizer(cfg, [2] * 5, shard)  # one stream a step (confirmation streams twice to re-match)
weight = torch.randn(len(shard.members), 16, 8, requires_grad=True)
for step in range(2):
    passed_on.clear()
    regularizer.penalty(weight, step, lambda: 1.0)[0].backward()
    alive.append(sum(ref() is not None for ref in passed_on[1:]))  # and none after the step
print("ALIVE", rank, json.dumps(alive), flush=True)
full = shard.gather_to_main(local)  # a checkpoint's tensors: whole on rank 0 only
print("MAIN", rank, json.dumps(None if full is None else full[:, 0, 0].tolist()), flush=True)
process_group.close()
"""


def test_the_ring_streams_each_shard_once_holding_at_most_two_at_a_time(tmp_path):
    """ring.stream_shards on 4 ranks of 5 members: own first, then the shards 1, 2, 3 places before;
    a shard is received only when the one before it is taken (at most one ahead), and a rank keeps no
    shard it has passed on (also inside the penalty). Checkpoint tensors are gathered on rank 0 only."""
    script = tmp_path / "worker.py"
    script.write_text(_STREAM_WORKER)
    ranks = _launch_ranks([sys.executable, str(script)], world=4)
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), [err[-1500:] for _, err in outputs]
    members = [[0, 1], [2], [3], [4]]
    row_bytes = 3 * 4 * 4
    for rank, (out, _) in enumerate(outputs):
        lines = dict(line.split(" ", 1) for line in out.splitlines())
        seen = json.loads(lines["STREAM"].split(" ", 1)[1])
        assert json.loads(lines["ALIVE"].split(" ", 1)[1]) == [0, 0, 0, 0] * 2  # stages 1-3, then after, twice
        assert json.loads(lines["MAIN"].split(" ", 1)[1]) == ([0, 1, 2, 3, 4] if rank == 0 else None)
        order = [members[(rank - stage) % 4] for stage in range(4)]
        assert [m for m, _, _ in seen] == order
        # taking stage s, stage s + 1 is on its way: received so far, the shards of stages 1..s+1
        expected = [sum(len(order[t]) for t in range(1, min(s + 1, 3) + 1)) * row_bytes for s in range(4)]
        assert [b for _, b, _ in seen] == expected
        assert [alive for _, _, alive in seen] == [0, 0, 0, 0]  # shards taken before are freed


def test_a_run_moves_between_one_and_two_processes(tmp_path):
    """Started on 2 processes, resumed on 1 (and the other way round; and 3 -> 2: uneven shards, each
    process reading its own members' rows): the weights of one process."""
    overrides = SMALL + ["mfr.enabled=true"]
    _train(tmp_path / "whole", overrides)
    for first, then in ((2, 1), (1, 2), (3, 2)):
        run = tmp_path / f"{first}to{then}"
        _train(
            run,
            [o for o in overrides if not o.startswith("train.n_samples")] + ["train.n_samples=8000"],
            processes=first,
        )
        config = run / "config.yaml"  # the same run, made longer: resume continues from step 40
        config.write_text(config.read_text().replace("n_samples: 8000", "n_samples: 16000"))
        (run / "results.json").unlink()
        _train(run, [], processes=then, resume=True)
        _assert_same_weights(tmp_path / "whole", run, f"{first} -> {then} processes")


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (Linux /proc)."""
    ranks = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            if (proc / "stat").read_text().split()[3] != str(launcher_pid):
                continue
        except OSError:
            continue
        rank = [e for e in environ if e.startswith(b"RANK=")]
        if rank:
            ranks[int(rank[0][5:])] = int(proc.name)
    return ranks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes in /proc")
def test_a_killed_rank_stops_the_run_with_its_name_and_resume_continues(tmp_path):
    overrides = SMALL + ["mfr.enabled=true", "train.n_samples=400000", "train.checkpoint_every=10"]
    run = tmp_path / "run"
    launcher = _train(run, overrides, processes=2, wait=False)
    deadline = time.time() + 120
    while not (run / "checkpoint").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (run / "checkpoint").exists(), "no checkpoint within 2 minutes"
    workers = _worker_pids(launcher.pid)
    assert set(workers) == {0, 1}
    os.kill(workers[1], signal.SIGKILL)
    started = time.time()
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and time.time() - started < 60
    assert re.search(r"rank\s*:\s*1\b", stderr), stderr[-1500:]  # torchrun names the lost rank
    _, meta = load_trainer_state(run / "checkpoint")  # the checkpoint written before the kill is whole
    config = run / "config.yaml"  # end 20 steps after it, on one process
    config.write_text(config.read_text().replace("n_samples: 400000", f"n_samples: {(meta['step'] + 20) * 200}"))
    _train(run, [], resume=True)
    assert _results(run)["steps"] == meta["step"] + 20


def _launch_ranks(command: list[str], world: int = 2) -> list[subprocess.Popen]:
    """`world` ranks started by hand (as a cluster scheduler would: RANK, WORLD_SIZE, MASTER_ADDR set),
    without torchrun to stop the others when one dies."""
    port = _free_port()
    return [
        subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **ONE_THREAD,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
        )
        for rank in range(world)
    ]


def test_a_rank_that_loses_its_peer_outside_torchrun_stops_with_a_one_line_error(tmp_path):
    """No launcher to end the run: the collective itself fails, and the survivor names the lost rank."""
    run = tmp_path / "run"
    overrides = SMALL + ["mfr.enabled=true", "train.n_samples=400000", "train.checkpoint_every=10"]
    ranks = _launch_ranks(
        [sys.executable, "-m", "mfr_sae", "train", "--no-progress", "--out", str(run), *_set_args(overrides)]
    )
    deadline = time.time() + 120
    while not (run / "checkpoint").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (run / "checkpoint").exists(), "no checkpoint within 2 minutes"
    ranks[1].kill()
    started = time.time()
    _, stderr = ranks[0].communicate(timeout=120)
    ranks[1].communicate()
    assert ranks[0].returncode != 0 and time.time() - started < 60
    last = stderr.strip().splitlines()[-1]
    assert "error: lost contact with the other processes (rank 1 stopped answering)" in last, stderr[-1500:]
    assert "Traceback" not in stderr
    load_trainer_state(run / "checkpoint")  # the checkpoint written before the kill is whole


_FAILING_WORKER = """
import os, torch
from mfr_sae import distributed, process_group
from mfr_sae.train import TrainingError
rank, world, _ = process_group.init(torch.device("cpu"), 60)
shard = distributed.Shard(2, rank, world)
shard.barrier()
if rank == 1:
    process_group.report_failure(TrainingError("loss became nan at step 3"))
    os._exit(1)
try:
    shard.gather(torch.ones(1))
except process_group.RankLost as err:
    print("LOST", err, flush=True)
"""


def test_the_others_say_why_a_rank_stopped(tmp_path):
    """A rank that stops on an error leaves it on the rendezvous store; the ranks that lose it quote it."""
    script = tmp_path / "worker.py"
    script.write_text(_FAILING_WORKER)
    ranks = _launch_ranks([sys.executable, str(script)])
    out = [rank.communicate(timeout=120)[0] for rank in ranks]
    assert (
        "LOST lost contact with the other processes (rank 1 failed with TrainingError: loss became nan "
        "at step 3)" in out[0]
    ), out[0]


_COUNTING_WORKER = """
import json, sys
from mfr_sae import process_group
from mfr_sae.config import load_config
from mfr_sae.train import Trainer
trainer = Trainer(load_config(None, json.loads(sys.argv[2])), sys.argv[1], progress=False)
x = next(trainer.source.batches(trainer.cfg.train.batch_size))
received = []
for _ in range(4):
    before = trainer.shard.received_bytes
    trainer.train_step(x)
    received.append(trainer.shard.received_bytes - before)
# one write per line: the ranks share torchrun's stdout, unbuffered (print writes the newline apart)
sys.stdout.write(f"RECEIVED {trainer.shard.rank} {json.dumps(received)}\\n")
sys.stdout.flush()
del trainer
process_group.close()
"""


@pytest.mark.parametrize("mfr", [False, True])
def test_what_travels_between_ranks_per_step(tmp_path, mfr):
    """Baseline: nothing between log steps. MFR (re-matching every 2 steps): the other rank's decoders,
    once, one number per member and, at a re-matching step, the matches of the pairs the other rank matched
    (counted: the tensors a rank receives)."""
    script = tmp_path / "worker.py"
    script.write_text(_COUNTING_WORKER)
    overrides = SMALL + ["mfr.reinit_window=0", f"mfr.enabled={str(mfr).lower()}", "mfr.match_every=2"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(tmp_path / "run"),
            json.dumps(overrides),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ONE_THREAD,
    )
    assert done.returncode == 0, _worker_errors(done.stderr)
    received = {
        int(rank): json.loads(values)
        for _, rank, values in (line.split(" ", 2) for line in done.stdout.splitlines() if line.startswith("RECEIVED"))
    }
    assert sorted(received) == [0, 1], done.stdout
    h, d = 64, 32  # SMALL; members 0, 1 on rank 0, member 2 on rank 1
    # pairs matched: (0, 1) on rank 0, (0, 2) and (1, 2) on rank 1 (the pairs across the shards go where
    # they even out the ranks' matching: 1 + 0 and 0 + 2)
    if not mfr:
        assert received == {0: [0] * 4, 1: [0] * 4}
        return
    remote = {0: 1, 1: 2}  # members held by the other rank
    remote_pairs = {0: 2, 1: 0}  # the pairs whose matches the other rank sends
    for rank in (0, 1):
        between = remote[rank] * (h * d * 4 + 4)  # fp32 decoder rows + the member's part of the penalty
        matching = between + remote_pairs[rank] * 2 * h * 4  # + [2, h] int32 matches per pair
        beta_auto = remote[rank] * 4  # step 0: the members' MSE, for beta = auto
        assert received[rank] == [matching + beta_auto, between, matching, between], rank
