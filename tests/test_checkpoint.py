import errno
import json
import os
import re
import stat

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mfr_sae import load
from mfr_sae.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    load_trainer_state,
    save_checkpoint,
    verify_checkpoint,
)
from mfr_sae.ensemble import Ensemble
from mfr_sae.files import sha256, write_json


def _trained_like(tied=True):
    ens = Ensemble(6, 10, [2, 4], tied=tied, decoder_bias=True, seed=3)
    with torch.no_grad():
        ens.b_enc.normal_()
        ens.b_dec.normal_()
    return ens


def _without_digests(run_dir):
    """As a checkpoint written before digests were recorded: files edited by hand below then reach the
    checks of their content (the digests would refuse them first)."""
    (run_dir / "checkpoint" / "digests.json").unlink()


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_of_a_run_and_of_one_member(tmp_path, tied):
    ens = _trained_like(tied)
    save_checkpoint(tmp_path, ens)
    x = torch.randn(9, 6)
    loaded = load(tmp_path)
    torch.testing.assert_close(loaded(x).x_hat, ens(x).x_hat)
    one = load(tmp_path / "checkpoint" / "member_1")
    assert one.n_members == 1 and one.ks == [4]
    torch.testing.assert_close(one(x).x_hat[0], ens(x).x_hat[1])


def test_saelens_names_shapes_and_semantics(tmp_path):
    ens = _trained_like()
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


def test_corrupt_or_missing_files_are_clear_errors(tmp_path):
    save_checkpoint(tmp_path, _trained_like())
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


def test_a_save_cut_off_mid_swap_leaves_the_previous_checkpoint(tmp_path):
    first = _trained_like()
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


def test_shape_mismatch_names_the_tensor(tmp_path):
    save_checkpoint(tmp_path, _trained_like())
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
def test_non_finite_weights_are_refused_naming_the_file_and_tensor(tmp_path, name, value, message):
    save_checkpoint(tmp_path, _trained_like())
    _without_digests(tmp_path)
    path = tmp_path / "checkpoint" / "member_1" / "sae_weights.safetensors"
    weights = load_file(path)
    weights[name].view(-1)[3] = value  # same names and shapes: only the values are wrong
    save_file(weights, path)
    with pytest.raises(
        CheckpointError, match=f"checkpoint/member_1/sae_weights.safetensors: {message} \\(1 of \\d+ values\\)"
    ):
        load(tmp_path)


def test_a_wrongly_sized_tensor_is_refused_naming_the_file_and_tensor(tmp_path):
    save_checkpoint(tmp_path, _trained_like())
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


def test_renames_into_a_folder_are_made_durable(tmp_path, monkeypatch):
    seen = _fsynced_folders(monkeypatch)
    save_checkpoint(tmp_path, _trained_like())
    assert _id(tmp_path) in seen  # the rename checkpoint.tmp -> checkpoint
    assert _id(tmp_path / "checkpoint") in seen and _id(tmp_path / "checkpoint" / "member_0") in seen
    seen.clear()
    (tmp_path / "sub").mkdir()
    write_json(tmp_path / "sub" / "results.json", {"a": 1})  # atomic_write_text: os.replace, then the folder
    assert seen == [_id(tmp_path / "sub")]


def test_saelens_loads_a_saved_member_and_agrees(tmp_path):
    import sae_lens  # the test extra pins it (.ci/run)

    ens = _trained_like()
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


MEMBER_FILES = ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
CORRUPT = "is corrupt: its SHA-256 is not the one recorded when the checkpoint was written"


def _full_checkpoint(run_dir, seed=3):
    """A checkpoint with every kind of file: each member's cfg.json, weights and sparsity, the trainer state."""
    ens = _trained_like() if seed == 3 else Ensemble(6, 10, [2, 4], decoder_bias=True, seed=seed)
    state = {"optimizer.W_enc.exp_avg": torch.randn(2, 10, 6), "optimizer.W_enc.step": torch.tensor(3.0)}
    save_checkpoint(run_dir, ens, state, {"step": 3}, firing_prob=torch.rand(2, 10))
    return ens


def test_digests_are_of_every_file_as_written_beside_the_member_folders(tmp_path):
    _full_checkpoint(tmp_path)
    folder = tmp_path / "checkpoint"
    listed = json.loads((folder / "digests.json").read_text())["sha256"]
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    assert sorted(listed) == sorted(f for f in files if f != "digests.json")
    assert len(listed) == 7 and all(listed[name] == sha256(folder / name) for name in listed)
    assert "sha256" not in (folder / "member_0" / "cfg.json").read_text()  # SAELens' config as it was
    assert verify_checkpoint(folder) == ([], 7)


@pytest.mark.parametrize("name", MEMBER_FILES)
def test_load_names_a_member_file_with_one_flipped_byte(tmp_path, name, flip_byte):
    _full_checkpoint(tmp_path)
    path = tmp_path / "checkpoint" / "member_1" / name
    flip_byte(path)
    for where in (tmp_path, tmp_path / "checkpoint", path.parent):  # a run, its checkpoint, the member alone
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))} {CORRUPT}$"):
            load(where)
    assert load(tmp_path, members=[0]).ks == [2]  # each member is checked on its own


def test_load_trainer_state_names_its_file_with_one_flipped_byte(tmp_path, flip_byte):
    _full_checkpoint(tmp_path)
    path = tmp_path / "checkpoint" / "trainer_state.safetensors"
    flip_byte(path)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))} {CORRUPT}$"):
        load_trainer_state(tmp_path / "checkpoint", slice(0, 1))
    assert load(tmp_path).ks == [2, 4]  # the members' own files are intact


def test_verify_names_each_corrupt_or_missing_file_in_one_line(tmp_path, flip_byte):
    _full_checkpoint(tmp_path)
    folder = tmp_path / "checkpoint"
    for name in [f"member_1/{n}" for n in MEMBER_FILES] + ["trainer_state.safetensors"]:
        flip_byte(folder / name)
    (folder / "member_0" / "sparsity.safetensors").unlink()
    problems, checked = verify_checkpoint(folder)
    assert checked == 7
    assert problems == [f"missing file: {folder / 'member_0' / 'sparsity.safetensors'}"] + [
        f"{folder / name} {CORRUPT}"
        for name in ("member_1/cfg.json", "member_1/sae_weights.safetensors", "member_1/sparsity.safetensors")
    ] + [f"{folder / 'trainer_state.safetensors'} {CORRUPT}"]


def test_a_damaged_digest_list_is_named_rather_than_a_file_it_lists(tmp_path):
    _full_checkpoint(tmp_path)
    path = tmp_path / "checkpoint" / "digests.json"
    record = json.loads(path.read_text())
    digest = record["sha256"]["member_0/cfg.json"]
    record["sha256"]["member_0/cfg.json"] = ("1" if digest[0] == "0" else "0") + digest[1:]  # still valid JSON
    path.write_text(json.dumps(record))
    message = f"{path} is corrupt: the checkpoint's files cannot be checked against it"
    with pytest.raises(CheckpointError, match=f"^{re.escape(message)}$"):
        load(tmp_path)
    assert verify_checkpoint(tmp_path / "checkpoint") == ([message], 0)


def test_a_checkpoint_written_before_digests_still_loads(tmp_path):
    ens = _full_checkpoint(tmp_path)
    _without_digests(tmp_path)
    x = torch.randn(5, 6)
    torch.testing.assert_close(load(tmp_path)(x).x_hat, ens(x).x_hat)
    assert load_trainer_state(tmp_path / "checkpoint")[1] == {"step": 3}
    assert verify_checkpoint(tmp_path / "checkpoint") == ([], 0)


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
    tmp_path, full_disk, error, why
):
    first = _full_checkpoint(tmp_path)
    before = _contents(tmp_path / "checkpoint")
    full_disk(lambda path: path.parent.name == "member_1", error)  # partway: member_0's files are written
    with pytest.raises(CheckpointError) as caught:
        _full_checkpoint(tmp_path, seed=9)
    assert str(caught.value) == (
        f"cannot write the checkpoint {tmp_path / 'checkpoint.tmp'} ({why}); it was removed and the previous "
        f"checkpoint {tmp_path / 'checkpoint'} is untouched: free space on that disk (or make it writable), then "
        f"run `mfr-sae train --resume {tmp_path}`"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert _contents(tmp_path / "checkpoint") == before
    x = torch.randn(5, 6)
    torch.testing.assert_close(load(tmp_path)(x).x_hat, first(x).x_hat)


def test_a_failed_first_checkpoint_leaves_nothing_and_other_errors_pass_through(tmp_path, full_disk):
    full_disk(lambda path: True)
    with pytest.raises(CheckpointError, match="there is no earlier checkpoint: .* then run the same command again$"):
        _full_checkpoint(tmp_path)
    full_disk(lambda path: True, KeyboardInterrupt())  # not an I/O error: passed on as it is
    with pytest.raises(KeyboardInterrupt):
        _full_checkpoint(tmp_path)
    assert list(tmp_path.iterdir()) == []
