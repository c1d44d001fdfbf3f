import errno
import json
import os
import stat

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mfr_sae import load
from mfr_sae.checkpoint import checkpoint_dir, save_checkpoint
from mfr_sae.ensemble import Ensemble
from mfr_sae.errors import CheckpointError
from mfr_sae.files import write_json


def _without_digests(run_dir):
    """As a checkpoint written before digests were recorded: files edited by hand below then reach the
    checks of their content (the digests would refuse them first)."""
    (run_dir / "checkpoint" / "digests.json").unlink()


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_of_a_run_and_of_one_member(tmp_path, tied, trained_like):
    ens = trained_like(tied)
    save_checkpoint(tmp_path, ens)
    x = torch.randn(9, 6)
    loaded = load(tmp_path)
    torch.testing.assert_close(loaded(x).x_hat, ens(x).x_hat)
    one = load(tmp_path / "checkpoint" / "member_1")
    assert one.n_members == 1 and one.ks == [4]
    torch.testing.assert_close(one(x).x_hat[0], ens(x).x_hat[1])


def test_saelens_names_shapes_and_semantics(tmp_path, trained_like):
    ens = trained_like()
    save_checkpoint(tmp_path, ens)
    folder = tmp_path / "checkpoint" / "member_0"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 2 and cfg["d_in"] == 6 and cfg["d_sae"] == 10
    assert cfg["dtype"] == "float32" and cfg["apply_b_dec_to_input"] is True
    w = load_file(folder / "sae_weights.safetensors")
    assert {k: tuple(v.shape) for k, v in w.items()} == {
        "W_enc": (6, 10),
        "b_enc": (10,),
        "W_dec": (10, 6),
        "b_dec": (6,),
    }
    # SAELens' TopK forward on the saved tensors gives the ensemble's output
    x = torch.randn(9, 6)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    top = pre.topk(2, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    torch.testing.assert_close(z @ w["W_dec"] + w["b_dec"], ens(x).x_hat[0])


def test_corrupt_or_missing_files_are_clear_errors(tmp_path, trained_like):
    save_checkpoint(tmp_path, trained_like())
    _without_digests(tmp_path)
    weights = tmp_path / "checkpoint" / "member_1" / "sae_weights.safetensors"
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt checkpoint file .*member_1"):
        load(tmp_path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="missing file: .*member_1"):
        load(tmp_path)
    with pytest.raises(CheckpointError, match="no SAE or run found"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no member"):
        load(tmp_path / "empty")


def test_a_save_cut_off_mid_swap_leaves_the_previous_checkpoint(tmp_path, trained_like):
    first = trained_like()
    save_checkpoint(tmp_path, first)
    # A crash after renaming checkpoint -> checkpoint.old and before the new one is renamed in:
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint.tmp").mkdir()
    (tmp_path / "checkpoint.tmp" / "member_0").mkdir()  # half written
    assert checkpoint_dir(tmp_path) == tmp_path / "checkpoint.old"
    x = torch.randn(5, 6)
    torch.testing.assert_close(load(tmp_path)(x).x_hat, first(x).x_hat)
    # the next save replaces the leftovers
    second = Ensemble(6, 10, [2, 4], decoder_bias=True, seed=9)
    save_checkpoint(tmp_path, second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    torch.testing.assert_close(load(tmp_path)(x).x_hat, second(x).x_hat)


def test_shape_mismatch_names_the_tensor(tmp_path, trained_like):
    save_checkpoint(tmp_path, trained_like())
    _without_digests(tmp_path)
    cfg_path = tmp_path / "checkpoint" / "member_0" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["d_sae"] = 11
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="W_enc has shape \\[6, 10\\], cfg.json says \\[6, 11\\]"):
        load(tmp_path / "checkpoint" / "member_0")


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("W_enc", float("nan"), "W_enc holds NaN"),
        ("b_dec", float("inf"), "b_dec holds inf"),
        ("W_dec", float("-inf"), "W_dec holds inf"),
    ],
)
def test_non_finite_weights_are_refused_naming_the_file_and_tensor(tmp_path, name, value, message, trained_like):
    save_checkpoint(tmp_path, trained_like())
    _without_digests(tmp_path)
    path = tmp_path / "checkpoint" / "member_1" / "sae_weights.safetensors"
    weights = load_file(path)
    weights[name].view(-1)[3] = value  # same names and shapes: only the values are wrong
    save_file(weights, path)
    with pytest.raises(
        CheckpointError, match=f"checkpoint/member_1/sae_weights.safetensors: {message} \\(1 of \\d+ values\\)"
    ):
        load(tmp_path)


def test_a_wrongly_sized_tensor_is_refused_naming_the_file_and_tensor(tmp_path, trained_like):
    save_checkpoint(tmp_path, trained_like())
    _without_digests(tmp_path)
    path = tmp_path / "checkpoint" / "member_0" / "sae_weights.safetensors"
    weights = load_file(path)
    weights["b_enc"] = torch.zeros(9)
    save_file(weights, path)
    with pytest.raises(
        CheckpointError, match="member_0/sae_weights.safetensors: b_enc has shape \\[9\\], cfg.json says \\[10\\]"
    ):
        load(tmp_path)


def _fsynced_folders(monkeypatch):
    """The (device, inode) of every folder that os.fsync is called on from now."""
    seen, real = [], os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            seen.append((st.st_dev, st.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def _id(path):
    st = path.stat()
    return st.st_dev, st.st_ino


def test_renames_into_a_folder_are_made_durable(tmp_path, monkeypatch, trained_like):
    seen = _fsynced_folders(monkeypatch)
    save_checkpoint(tmp_path, trained_like())
    assert _id(tmp_path) in seen  # the rename checkpoint.tmp -> checkpoint
    assert _id(tmp_path / "checkpoint") in seen and _id(tmp_path / "checkpoint" / "member_0") in seen
    seen.clear()
    (tmp_path / "sub").mkdir()
    write_json(tmp_path / "sub" / "results.json", {"a": 1})  # atomic_write_text: os.replace, then the folder
    assert seen == [_id(tmp_path / "sub")]


def test_saelens_loads_a_saved_member_and_agrees(tmp_path, trained_like):
    import sae_lens  # the test extra pins it (.ci/run)

    ens = trained_like()
    save_checkpoint(tmp_path, ens)
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "checkpoint" / "member_1"), device="cpu")
    assert type(sae).__name__ == "TopKSAE"
    x = torch.randn(9, 6)
    torch.testing.assert_close(sae(x), ens(x).x_hat[1], atol=1e-5, rtol=1e-5)


def test_cfg_json_says_whether_a_decoder_bias_is_applied(tmp_path):
    for bias in (False, True):
        save_checkpoint(tmp_path / str(bias), Ensemble(6, 10, [2], decoder_bias=bias))
        cfg = json.loads((tmp_path / str(bias) / "checkpoint" / "member_0" / "cfg.json").read_text())
        assert cfg["apply_b_dec_to_input"] is bias


def _contents(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "error, why",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
        (OSError(errno.EROFS, "Read-only file system"), "Read-only file system"),
        (
            SafetensorError("Error while serializing: I/O error: No space left"),
            "Error while serializing: I/O error: No space left",
        ),
    ],
)
def test_an_io_error_while_writing_removes_the_partial_checkpoint_and_keeps_the_previous(
    tmp_path, full_disk, error, why, full_checkpoint
):
    first = full_checkpoint(tmp_path)
    before = _contents(tmp_path / "checkpoint")
    full_disk(lambda path: path.parent.name == "member_1", error)  # partway: member_0's files are written
    with pytest.raises(CheckpointError) as caught:
        full_checkpoint(tmp_path, seed=9)
    assert str(caught.value) == (
        f"cannot write the checkpoint {tmp_path / 'checkpoint.tmp'} ({why}); it was removed and the previous "
        f"checkpoint {tmp_path / 'checkpoint'} is untouched: free space on that disk (or make it writable), then "
        f"run `mfr-sae train --resume {tmp_path}`"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert _contents(tmp_path / "checkpoint") == before
    x = torch.randn(5, 6)
    torch.testing.assert_close(load(tmp_path)(x).x_hat, first(x).x_hat)


def test_a_failed_first_checkpoint_leaves_nothing_and_other_errors_pass_through(tmp_path, full_disk, full_checkpoint):
    full_disk(lambda path: True)
    with pytest.raises(CheckpointError, match="there is no earlier checkpoint: .* then run the same command again$"):
        full_checkpoint(tmp_path)
    full_disk(lambda path: True, KeyboardInterrupt())  # not an I/O error: passed on as it is
    with pytest.raises(KeyboardInterrupt):
        full_checkpoint(tmp_path)
    assert list(tmp_path.iterdir()) == []
