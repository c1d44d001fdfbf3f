import json
import re
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from mfr_sae import extras
from mfr_sae.cli import main
from mfr_sae.data import DataError
from mfr_sae.data.activations import ActivationCache, build_cache, read_manifest, read_texts, token_sequences
from mfr_sae.data.lm_model import capture, load_model, resolve_hook
from mfr_sae.extras import MissingExtra


def test_aliases_and_module_paths_resolve_to_the_same_module(tiny_gpt2):
    model, _ = load_model(str(tiny_gpt2[0]))
    assert resolve_hook(model, "blocks.0.hook_mlp_out") == ("transformer.h.0.mlp", model.transformer.h[0].mlp)
    assert resolve_hook(model, "transformer.h.1.mlp")[1] is model.transformer.h[1].mlp
    assert resolve_hook(model, "blocks.1.hook_resid_post")[0] == "transformer.h.1"
    with pytest.raises(DataError, match="has no module 'transformer.h.7.mlp'"):
        resolve_hook(model, "blocks.7.hook_mlp_out")


def test_capture_equals_the_full_forward_and_stops_after_the_module(tiny_gpt2):
    model, _ = load_model(str(tiny_gpt2[0]))
    ids = torch.randint(0, 100, (2, 16))
    seen = {}
    handle = model.transformer.h[0].mlp.register_forward_hook(lambda m, i, o: seen.setdefault("full", o))
    calls = []
    later = model.transformer.h[1].register_forward_hook(lambda m, i, o: calls.append(1))
    model(input_ids=ids)
    handle.remove()
    calls.clear()
    acts = capture(model, model.transformer.h[0].mlp, ids)
    later.remove()
    torch.testing.assert_close(acts, seen["full"])
    assert calls == []  # block 1 never ran
    # position embeddings are real: the same token at two positions gives two activations
    same = capture(model, model.transformer.h[0].mlp, torch.full((1, 4), 5))
    assert not torch.allclose(same[0, 1], same[0, 2])


def test_sequences_start_with_bos_and_have_the_context_length(tiny_gpt2, tmp_path):
    _, tokenizer = load_model(str(tiny_gpt2[0]))
    seqs = list(token_sequences(read_texts(str(tiny_gpt2[1])), tokenizer, 20))
    assert len(seqs) > 50 and all(len(s) == 20 and s[0] == tokenizer.bos_token_id for s in seqs)
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "the cat"}) + "\n" + json.dumps({"x": 1}) + "\n")
    with pytest.raises(DataError, match="line 2 is not a JSON object with a 'text' field"):
        list(read_texts(str(tmp_path / "t.jsonl")))


def test_the_cache_holds_the_hooked_activations_without_bos(tiny_gpt2, tmp_path):
    model_dir, corpus = tiny_gpt2
    out = build_cache(
        str(model_dir),
        "blocks.0.hook_mlp_out",
        str(corpus),
        tmp_path / "cache",
        n_tokens=500,
        context=16,
        batch_size=4,
        shard_tokens=200,
        progress=False,
    )
    manifest = read_manifest(out)
    assert [s["rows"] for s in manifest["shards"]] == [200, 200, 100]
    assert manifest["d"] == 32 and manifest["module"] == "transformer.h.0.mlp" and manifest["n_tokens"] == 500
    model, tokenizer = load_model(str(model_dir))
    first = next(token_sequences(read_texts(str(corpus)), tokenizer, 16))
    expected = capture(model, model.transformer.h[0].mlp, first[None])[0, 1:]
    stored = np.load(out / "shard_00000.npy")[:15]
    np.testing.assert_allclose(stored, expected.numpy(), rtol=1e-5, atol=1e-6)
    # reused when it matches, refused when it does not
    mtime = (out / "manifest.json").stat().st_mtime_ns
    build_cache(str(model_dir), "blocks.0.hook_mlp_out", str(corpus), out, 500, 16, progress=False)
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match="holds a different cache .*n_tokens"):
        build_cache(str(model_dir), "blocks.0.hook_mlp_out", str(corpus), out, 600, 16, progress=False)
    # a corrupt shard is caught by its checksum
    shard = out / "shard_00001.npy"
    data = bytearray(shard.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard_00001.npy: checksum mismatch"):
        ActivationCache(out, holdout=50)


def test_missing_model_or_text_are_clear_errors(tmp_path, capsys):
    code = main(
        [
            "cache",
            "--model",
            str(tmp_path / "no-model"),
            "--text",
            "x.txt",
            "--out",
            str(tmp_path / "c"),
            "--no-progress",
        ]
    )
    assert code == 2 and "cannot load model" in capsys.readouterr().err
    with pytest.raises(DataError, match="not an activation cache"):
        read_manifest(tmp_path)


def _cache_args(tiny_gpt2, out, tokens=100):
    model_dir, corpus = tiny_gpt2
    return [
        "cache",
        "--model",
        str(model_dir),
        "--text",
        str(corpus),
        "--out",
        str(out),
        "--tokens",
        str(tokens),
        "--context",
        "16",
        "--shard-tokens",
        "60",
        "--no-progress",
    ]


def test_cache_refuses_a_folder_that_is_neither_empty_nor_a_cache(tiny_gpt2, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert main(_cache_args(tiny_gpt2, mine)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(mine) in err and "not empty and is not an activation cache" in err
    assert (mine / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # nothing built beside it either
    (tmp_path / "file.npy").write_text("a file")
    assert main(_cache_args(tiny_gpt2, tmp_path / "file.npy")) == 2
    assert "a file, not a folder" in capsys.readouterr().err and (tmp_path / "file.npy").read_text() == "a file"


def test_cache_builds_beside_under_its_own_name_and_leaves_other_folders_alone(tiny_gpt2, tmp_path, capsys):
    out = tmp_path / "cache"
    out.mkdir()  # an empty folder is fine
    (tmp_path / "cache.tmp").mkdir()  # the user's, not the builder's
    (tmp_path / "cache.tmp" / "keep.txt").write_text("mine")
    assert main(_cache_args(tiny_gpt2, out)) == 0
    assert (tmp_path / "cache.tmp" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "cache.tmp"]
    assert read_manifest(out)["n_tokens"] == 100 and len(read_manifest(out)["shards"]) == 2
    # a build that fails removes its own folder and nothing else
    short = tmp_path / "short.txt"
    short.write_text("the cat sees the dog and the dog sees the cat.\n" * 3)
    with pytest.raises(DataError, match="fewer than the 1000 asked for"):
        build_cache(str(tiny_gpt2[0]), "blocks.0.hook_mlp_out", str(short), tmp_path / "big", 1000, 16, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "cache.tmp", "short.txt"]
    assert (tmp_path / "cache.tmp" / "keep.txt").read_text() == "mine"


def test_missing_transformers_is_a_one_line_error_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)
    hint = re.escape(extras.hint("transformers"))
    assert hint.endswith(re.escape('[lm]"'))
    with pytest.raises(MissingExtra, match=f"language model .* needs transformers: {hint}"):
        load_model("gpt2")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MissingExtra, match=f"needs datasets: {hint}"):
        list(read_texts("someone/some-dataset"))
