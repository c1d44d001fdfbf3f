import json
import sys

import pytest
import torch

from mfr_sae.extras import MissingExtra

# Two cheap datasets on which the tiny GPT-2's last block is clearly informative (baseline test AUC 0.81 and 0.68):
# 1,062 and 1,250 short prompts, some longer than the tiny model's 64 positions.
DATASETS = ["131_temp_cat_Typical Time", "134_context_type_Belief_states"]
HOOK = "blocks.1.hook_resid_post"
MAX_LENGTH = 64  # the tiny GPT-2's n_positions


class SignSplit:
    """Keeps every bit of the activation as non-negative latents: ReLU(x) beside ReLU(-x)."""

    def encode(self, x):
        return torch.cat([x.relu(), (-x).relu()], dim=1)


class Silent:
    """Latents that never fire: nothing to probe."""

    def encode(self, x):
        return x.new_zeros(x.shape[0], 8)


@pytest.fixture(scope="module")
def tiny_probe(tiny_gpt2, tmp_path_factory):
    """(model, tokenizer, the activation cache) with the tiny GPT-2's activations for DATASETS written."""
    pytest.importorskip("sae_probes")
    from mfr_sae.data.lm_model import load_model
    from mfr_sae.probing import write_probe_activations

    model, tokenizer = load_model(str(tiny_gpt2[0]))
    cache = tmp_path_factory.mktemp("probe_cache")
    write_probe_activations(model, tokenizer, HOOK, DATASETS, cache, "tiny", max_length=MAX_LENGTH, progress=False)
    return model, tokenizer, cache


def block_output(model, ids):
    """The last block's output at the last token of one unpadded sequence, read with a hook of the test's own."""
    seen = {}

    def keep(_module, _inputs, out):
        seen["out"] = out[0] if isinstance(out, tuple) else out  # a tuple in transformers 4

    handle = model.transformer.h[1].register_forward_hook(keep)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    handle.remove()
    return seen["out"][0, -1]


def test_activation_files_hold_each_prompts_last_token(tiny_probe):
    from sae_probes.utils_data import read_numbered_dataset_df

    model, tokenizer, cache = tiny_probe
    for dataset in DATASETS:
        path = cache / "model_activations_tiny" / f"{dataset}_{HOOK}.pt"
        acts = torch.load(path)
        prompts = list(read_numbered_dataset_df(dataset)["prompt"])
        ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
        assert acts.dtype == torch.float32 and acts.shape == (len(prompts), 32)
        longest, shortest = (
            max(range(len(ids)), key=lambda i: len(ids[i])),
            min(range(len(ids)), key=lambda i: len(ids[i])),
        )
        rows = [0, shortest, longest]  # the longest is cut to BOS and its last MAX_LENGTH - 1 tokens in the file
        for row in rows:
            expected = block_output(model, [tokenizer.bos_token_id, *ids[row][-(MAX_LENGTH - 1) :]])
            torch.testing.assert_close(acts[row], expected, atol=1e-5, rtol=1e-5)
    assert len(ids[longest]) > MAX_LENGTH
    assert not list(cache.glob("**/.*.tmp"))


def test_prompts_start_with_bos_and_keep_their_last_tokens(tiny_gpt2):
    from mfr_sae.data.lm_model import load_model
    from mfr_sae.probing import with_bos

    _, tokenizer = load_model(str(tiny_gpt2[0]))
    tokens = tokenizer("the cat sees the dog", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    assert with_bos(tokenizer, "the cat sees the dog", 1024) == [bos, *tokens]
    assert with_bos(tokenizer, "the cat sees the dog", 3) == [bos, *tokens[-2:]]


def test_written_files_are_not_rewritten(tiny_probe):
    from mfr_sae.probing import write_probe_activations

    model, tokenizer, cache = tiny_probe
    before = {p: p.stat().st_mtime_ns for p in cache.glob("model_activations_tiny/*.pt")}
    folder = write_probe_activations(model, tokenizer, HOOK, DATASETS, cache, "tiny", progress=False)
    assert folder == cache / "model_activations_tiny"
    assert {p: p.stat().st_mtime_ns for p in cache.glob("model_activations_tiny/*.pt")} == before


def test_probes_read_the_latents_the_encoder_keeps(tiny_probe, tmp_path):
    """Latents holding the whole activation probe as well as the raw activations at the largest k; silent ones at
    chance. Each encoder keeps its own results folder, so neither reuses the other's files."""
    from mfr_sae.probing import sparse_probing

    _, _, cache = tiny_probe
    summary = sparse_probing(
        [SignSplit(), Silent()], "tiny", HOOK, cache, tmp_path, DATASETS, ks=[1, 64], progress=False
    )
    json.dumps(summary)
    assert summary["datasets"] == DATASETS and summary["ks"] == [1, 64]
    baseline = summary["baseline"]["test_auc"]
    split, silent = (member["by_k"]["64"]["test_auc"] for member in summary["members"])
    assert set(summary["baseline"]["per_dataset"]) == set(DATASETS)
    assert baseline > 0.65
    assert abs(split - baseline) < 0.05
    assert split > silent + 0.15 and abs(silent - 0.5) < 0.02
    assert sorted(p.name for p in tmp_path.iterdir()) == ["member_0", "member_1"]
    assert (cache / "baseline_results_tiny").is_dir()  # beside the activations: shared by every run of the model


def test_batches_hold_prompts_of_like_length_within_the_token_budget():
    from mfr_sae.data.lm_model import BATCH_TOKENS, length_batches

    ids = [[1] * n for n in [5, 1024, 3, 700, 1024, 8, 2, 1024, 400] * 10]
    batches = list(length_batches(ids, batch_size=16))
    assert sorted(i for batch in batches for i in batch) == list(range(len(ids)))
    for batch in batches:
        longest = max(len(ids[i]) for i in batch)
        assert len(batch) <= 16 and len(batch) * longest <= BATCH_TOKENS
    lengths = [len(ids[i]) for batch in batches for i in batch]
    assert lengths == sorted(lengths)


def test_probing_needs_every_activation_file(tmp_path):
    pytest.importorskip("sae_probes")
    from mfr_sae.data.vectors import DataError
    from mfr_sae.probing import sparse_probing

    with pytest.raises(DataError, match="write_probe_activations"):
        sparse_probing([Silent()], "tiny", HOOK, tmp_path, tmp_path / "results", DATASETS[:1], progress=False)


def test_member_encoder_gives_that_members_dense_latents(trained_like):
    from mfr_sae.probing import MemberEncoder

    ensemble = trained_like()
    x = torch.randn(5, 6)
    torch.testing.assert_close(MemberEncoder(ensemble, 1).encode(x), ensemble.dense_codes(x)[1])


def test_cheap_datasets_are_the_shortest_of_all():
    pytest.importorskip("sae_probes")
    from sae_probes.utils_data import read_numbered_dataset_df

    from mfr_sae.probing import probe_datasets

    everything = probe_datasets("all")
    cheap = probe_datasets("cheap")
    assert len(everything) == 113 and len(cheap) == 25
    characters = {ds: read_numbered_dataset_df(ds)["prompt"].str.len().sum() for ds in everything}
    assert cheap == sorted(everything, key=characters.__getitem__)[:25]
    assert probe_datasets(cheap[:2]) == cheap[:2]
    with pytest.raises(ValueError, match="'no_such_dataset'.*sae_probes.DATASETS"):
        probe_datasets(["119_us_state_TX", "no_such_dataset"])


@pytest.mark.parametrize("module", ["sae_probes", "sklearn"])
def test_a_missing_package_names_the_extra(monkeypatch, module):
    from mfr_sae.probing import probe_datasets

    if module == "sae_probes":
        pytest.importorskip("sklearn")  # asked for first
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    with pytest.raises(MissingExtra, match=rf"sparse probing needs {module}: pip install .*\[evals\]"):
        probe_datasets("all")
