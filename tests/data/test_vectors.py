import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mfr_sae.cli import main
from mfr_sae.config import load_config
from mfr_sae.data import DataError, SyntheticData, VectorsData, load_ground_truth
from mfr_sae.train import train


def _rows(n=1000, d=6):
    return np.arange(n * d, dtype=np.float32).reshape(n, d)


def test_one_epoch_visits_every_training_row_once_in_a_shuffled_order(tmp_path):
    np.save(tmp_path / "x.npy", _rows())
    data = VectorsData(tmp_path / "x.npy", seed=0, holdout=100, shuffle_buffer=128)
    batches = data.batches(50)
    epoch = torch.cat([next(batches) for _ in range(18)])  # 900 training rows
    ids = (epoch[:, 0] / 6).long()
    assert sorted(ids.tolist()) == list(range(900))
    assert ids.tolist() != list(range(900))
    assert torch.equal(data.eval_vectors(100), torch.from_numpy(_rows()[900:]))
    assert torch.equal(data.eval_vectors(30), torch.from_numpy(_rows()[900:930]))


def test_the_stream_restarts_exactly_at_any_step(tmp_path):
    np.save(tmp_path / "x.npy", _rows())
    data = VectorsData(tmp_path / "x.npy", seed=3, holdout=100, shuffle_buffer=128)
    stream = data.batches(70)
    full = [next(stream) for _ in range(30)]  # crosses two epoch boundaries
    for start in (0, 1, 12, 13, 25):
        again = data.batches(70, start_step=start)
        for expected in full[start : start + 4]:
            assert torch.equal(next(again), expected)
    other = VectorsData(tmp_path / "x.npy", seed=4, holdout=100, shuffle_buffer=128)
    assert not torch.equal(next(other.batches(70)), full[0])


def test_a_folder_of_npy_and_safetensors_shards_is_one_array(tmp_path):
    rows = _rows(300)
    np.save(tmp_path / "a.npy", rows[:120])
    save_file({"acts": torch.from_numpy(rows[120:]).to(torch.bfloat16).float()}, tmp_path / "b.safetensors")
    data = VectorsData(tmp_path, holdout=50, shuffle_buffer=64)
    assert data.d == 6 and data.n_train == 250
    torch.testing.assert_close(data.read_rows(100, 140), torch.from_numpy(rows[100:140]), rtol=1e-2, atol=0)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros(10, np.float32), r"expected a 2-D array \[n_vectors, d\], got shape \[10\]"),
        (np.zeros((10, 4), np.int64), "expected floating-point vectors, got dtype int64"),
        (np.zeros((0, 4), np.float32), "holds no vectors"),
    ],
)
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=message) as err:
        VectorsData(tmp_path / "bad.npy", holdout=1)
    assert "bad.npy" in str(err.value) and "\n" not in str(err.value)


def test_missing_and_mismatched_inputs(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        VectorsData(tmp_path / "none.npy")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="expected a .npy or .safetensors file"):
        VectorsData(tmp_path / "x.csv")
    np.save(tmp_path / "a.npy", _rows(20, 4))
    np.save(tmp_path / "b.npy", _rows(20, 5))
    with pytest.raises(DataError, match="shards differ in d"):
        VectorsData(tmp_path)
    with pytest.raises(DataError, match="not more than data.holdout=40"):
        VectorsData(tmp_path / "a.npy", holdout=40)
    (tmp_path / "c.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="c.npy: not a numpy array file"):
        VectorsData(tmp_path / "c.npy")


def test_nan_names_the_file_and_row_and_keeps_the_checkpoint(tmp_path):
    rows = np.random.default_rng(0).normal(size=(3000, 8)).astype(np.float32)
    rows[2500, 3] = np.nan
    np.save(tmp_path / "x.npy", rows)
    overrides = [
        "data.kind=vectors",
        f"data.path={tmp_path / 'x.npy'}",
        "data.holdout=100",
        "data.shuffle_buffer=400",
        "sae.d_sae=16",
        "sae.k=2",
        "train.batch_size=100",
        "train.n_samples=5000",
        "train.checkpoint_every=1",
        "eval.n_samples=100",
    ]
    sets = [a for o in overrides for a in ("--set", o)]
    assert main(["train", "--out", str(tmp_path / "run"), "--no-progress"] + sets) == 2
    with pytest.raises(DataError, match=r"x.npy: row 2500 holds NaN or inf"):
        train(load_config(None, overrides), tmp_path / "run2", progress=False)
    # the checkpoints written before the bad row are intact and loadable
    from mfr_sae import load

    assert load(tmp_path / "run2").n_members == 2


def test_ground_truth_in_either_layout(tmp_path):
    truth = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    np.save(tmp_path / "rows.npy", truth)
    np.save(tmp_path / "cols.npy", truth.T)
    a, layout_a = load_ground_truth(tmp_path / "rows.npy", 4)
    b, layout_b = load_ground_truth(tmp_path / "cols.npy", 4)
    assert torch.equal(a, b) and "rows are features" in layout_a and "transposed" in layout_b
    with pytest.raises(DataError, match="neither dimension matches d=5"):
        load_ground_truth(tmp_path / "rows.npy", 5)
    with pytest.raises(DataError, match="ground-truth file not found"):
        load_ground_truth(tmp_path / "none.npy", 4)


def test_end_to_end_on_a_npy_file_with_a_ground_truth_file(tmp_path, easy_overrides):
    source = SyntheticData(d=32, n_features=64, n_groups=4, n_active=3, seed=5)
    vectors = torch.cat([source.sample(10_000, 0, i) for i in range(21)])
    np.save(tmp_path / "acts.npy", vectors.numpy())
    np.save(tmp_path / "truth.npy", source.ground_truth.T.numpy())  # [d, n_true]: transposed on load
    cfg = load_config(
        None,
        easy_overrides
        + [
            "data.kind=vectors",
            f"data.path={tmp_path / 'acts.npy'}",
            "train.n_samples=400000",
            f"eval.ground_truth={tmp_path / 'truth.npy'}",
        ],
    )
    results = train(cfg, tmp_path / "run", progress=False)
    assert results["ground_truth"]["n_true"] == 64 and "transposed" in results["ground_truth"]["layout"]
    for member in results["members"]:
        assert member["gt_recovered_frac"] >= 0.9 and member["gt_mcc"] >= 0.9, member
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"]["data"]["d"] == 32


@pytest.mark.parametrize(
    "write",
    [
        lambda p: np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True),  # an object array
        lambda p: p.write_text("0.1 0.2 0.3\n0.4 0.5 0.6\n"),  # text under a .npy name
        lambda p: p.write_bytes(pickle.dumps(np.zeros((10, 4), np.float32))),  # a pickle of an array
        lambda p: p.write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr'"),  # a cut-off header
    ],
    ids=["object-array", "text", "pickle", "truncated"],
)
def test_a_file_that_is_not_a_numpy_array_is_a_one_line_error_naming_it(tmp_path, write):
    write(tmp_path / "acts.npy")
    with pytest.raises(DataError, match="not a numpy array file \\(\\.npy\\)") as err:
        VectorsData(tmp_path / "acts.npy", holdout=1)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'acts.npy'}: ") and "\n" not in message
    assert "allow_pickle" not in message and "numpy.save" in message
