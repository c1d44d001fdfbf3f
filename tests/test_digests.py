import json
import re

import pytest
import torch

from mfr_sae import load
from mfr_sae.digests import verify_checkpoint
from mfr_sae.errors import CheckpointError
from mfr_sae.files import sha256
from mfr_sae.trainer_state import load_trainer_state

MEMBER_FILES = ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
CORRUPT = "is corrupt: its SHA-256 is not the one recorded when the checkpoint was written"


def test_digests_are_of_every_file_as_written_beside_the_member_folders(tmp_path, full_checkpoint):
    full_checkpoint(tmp_path)
    folder = tmp_path / "checkpoint"
    listed = json.loads((folder / "digests.json").read_text())["sha256"]
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    assert sorted(listed) == sorted(f for f in files if f != "digests.json")
    assert len(listed) == 7 and all(listed[name] == sha256(folder / name) for name in listed)
    assert "sha256" not in (folder / "member_0" / "cfg.json").read_text()  # SAELens' config as it was
    assert verify_checkpoint(folder) == ([], 7)


@pytest.mark.parametrize("name", MEMBER_FILES)
def test_load_names_a_member_file_with_one_flipped_byte(tmp_path, name, flip_byte, full_checkpoint):
    full_checkpoint(tmp_path)
    path = tmp_path / "checkpoint" / "member_1" / name
    flip_byte(path)
    for where in (tmp_path, tmp_path / "checkpoint", path.parent):  # a run, its checkpoint, the member alone
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))} {CORRUPT}$"):
            load(where)
    assert load(tmp_path, members=[0]).ks == [2]  # each member is checked on its own


def test_load_trainer_state_names_its_file_with_one_flipped_byte(tmp_path, flip_byte, full_checkpoint):
    full_checkpoint(tmp_path)
    path = tmp_path / "checkpoint" / "trainer_state.safetensors"
    flip_byte(path)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))} {CORRUPT}$"):
        load_trainer_state(tmp_path / "checkpoint", slice(0, 1))
    assert load(tmp_path).ks == [2, 4]  # the members' own files are intact


def test_verify_names_each_corrupt_or_missing_file_in_one_line(tmp_path, flip_byte, full_checkpoint):
    full_checkpoint(tmp_path)
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


def test_a_damaged_digest_list_is_named_rather_than_a_file_it_lists(tmp_path, full_checkpoint):
    full_checkpoint(tmp_path)
    path = tmp_path / "checkpoint" / "digests.json"
    record = json.loads(path.read_text())
    digest = record["sha256"]["member_0/cfg.json"]
    record["sha256"]["member_0/cfg.json"] = ("1" if digest[0] == "0" else "0") + digest[1:]  # still valid JSON
    path.write_text(json.dumps(record))
    message = f"{path} is corrupt: the checkpoint's files cannot be checked against it"
    with pytest.raises(CheckpointError, match=f"^{re.escape(message)}$"):
        load(tmp_path)
    assert verify_checkpoint(tmp_path / "checkpoint") == ([message], 0)


def test_a_checkpoint_written_before_digests_still_loads(tmp_path, full_checkpoint):
    ens = full_checkpoint(tmp_path)
    (tmp_path / "checkpoint" / "digests.json").unlink()  # as before digests were recorded
    x = torch.randn(5, 6)
    torch.testing.assert_close(load(tmp_path)(x).x_hat, ens(x).x_hat)
    assert load_trainer_state(tmp_path / "checkpoint")[1] == {"step": 3}
    assert verify_checkpoint(tmp_path / "checkpoint") == ([], 0)
