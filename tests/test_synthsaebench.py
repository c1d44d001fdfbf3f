"""data/synthsaebench.py: the presets, their overrides, the model built like sae-lens's, and a deterministic stream."""

import sys

import pytest
import torch

pytest.importorskip("sae_lens")  # the [synth] extra (the test extra installs it)

from mfr_sae.data.synthsaebench import (
    EVAL_CHUNK,
    PRESETS,
    SynthSAEBenchData,
    build_model,
    orthogonalize,
    synthsaebench_config,
)
from mfr_sae.extras import MissingExtra
from mfr_sae.seeding import EVAL_STREAM, TRAIN_STREAM

# a small model of the recipe: built in well under a second
SMALL = {"num_features": 256, "hidden_dim": 32, "hierarchy.total_root_nodes": 2, "orthogonalization.num_steps": 10}


@pytest.fixture(scope="module")
def source():
    return SynthSAEBenchData("synthsaebench-1k", SMALL)


def test_the_16k_preset_is_the_published_configuration():
    # experiments/create_synth_bench_16k_model.py of decoderesearch/synth-sae-bench-experiments, as to_dict writes it
    assert synthsaebench_config("synthsaebench-16k").to_dict() == {
        "num_features": 16_384,
        "hidden_dim": 768,
        "firing_probability": {"exponent": 0.5, "max_prob": 0.4, "min_prob": 5e-4, "generator_name": "zipfian"},
        "hierarchy": {
            "total_root_nodes": 128,
            "branching_factor": 4,
            "max_depth": 3,
            "mutually_exclusive_portion": 1.0,
            "mutually_exclusive_min_depth": 0,
            "mutually_exclusive_max_depth": None,
            "compensate_probabilities": True,
            "scale_children_by_parent": True,
        },
        "orthogonalization": {"num_steps": 100, "lr": 3e-4, "chunk_size": 1024},
        "correlation": {"rank": 25, "correlation_scale": 0.1, "seed": None},
        "std_firing_magnitudes": {
            "mean": 0.5,
            "std": 0.5,
            "min_value": None,
            "max_value": None,
            "generator_name": "folded_normal",
        },
        "mean_firing_magnitudes": {"start": 5.0, "end": 4.0, "generator_name": "linear"},
        "bias": 0.5,
        "dtype": "float32",
        "seed": 42,
    }
    assert PRESETS["synthsaebench-1k"] == (1024, 256)
    small = synthsaebench_config("synthsaebench-1k")
    assert small.hierarchy.total_root_nodes == 8 and small.correlation.rank == 25  # the same recipe


def test_overrides_nested_dotted_and_replacing():
    cfg = synthsaebench_config(
        "synthsaebench-1k",
        {
            "seed": 7,
            "hierarchy": {"max_depth": 2},
            "hierarchy.branching_factor": [2, 5],  # YAML gives a list
            "mean_firing_magnitudes": 3.0,  # a config replaced by a number
            "std_firing_magnitudes": {"std": 0.25},  # merged: mean stays 0.5
            "firing_probability": {"generator_name": "linear", "max_prob": 0.3, "min_prob": 0.01},  # replaced
        },
    )
    assert cfg.seed == 7 and cfg.hierarchy.max_depth == 2 and cfg.hierarchy.branching_factor == (2, 5)
    assert cfg.hierarchy.total_root_nodes == 8 and cfg.hierarchy.scale_children_by_parent
    assert cfg.mean_firing_magnitudes == 3.0
    assert (cfg.std_firing_magnitudes.mean, cfg.std_firing_magnitudes.std) == (0.5, 0.25)
    assert type(cfg.firing_probability).__name__ == "LinearFiringProbabilityConfig"
    off = synthsaebench_config("synthsaebench-1k", {"correlation": None, "hierarchy": None})
    assert off.correlation is None and off.hierarchy is None


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("synthsaebench-2k", None, "not a SynthSAEBench preset (known: synthsaebench-16k"),
        ("synthsaebench-1k", {"num_featurez": 5}, "no field num_featurez"),
        ("synthsaebench-1k", {"hierarchy.depth": 5}, "no field hierarchy.depth (fields of hierarchy:"),
        ("synthsaebench-1k", {"hierarchy.max_depth": 0}, "max_depth must be at least 1"),
        ("synthsaebench-1k", {"firing_probability": {"generator_name": "nope"}}, "Unknown name: 'nope'"),
    ],
)
def test_unknown_presets_fields_and_bad_values_are_named(preset, overrides, message):
    with pytest.raises(ValueError) as err:
        synthsaebench_config(preset, overrides)
    assert message in str(err.value)


def test_orthogonalize_is_sae_lens_up_to_rounding():
    from sae_lens.synthetic import orthogonalize_embeddings

    start = torch.nn.functional.normalize(torch.randn(200, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    ours = orthogonalize(start, num_steps=10, lr=3e-3)
    theirs = orthogonalize_embeddings(start, num_steps=10, lr=3e-3, chunk_size=64)
    assert (theirs - start).abs().max() > 1e-2  # it moved
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=0)


def test_the_model_is_the_one_sae_lens_builds():
    cfg = synthsaebench_config("synthsaebench-1k", SMALL)
    ours, theirs = build_model(cfg), build_model(cfg, exact=True)
    ours_f, theirs_f = ours.feature_dict.feature_vectors, theirs.feature_dict.feature_vectors
    torch.testing.assert_close(ours_f, theirs_f, atol=1e-6, rtol=0)
    assert torch.equal(ours.feature_dict.bias, theirs.feature_dict.bias)
    for name in ("firing_probabilities", "mean_firing_magnitudes", "std_firing_magnitudes"):
        assert torch.equal(getattr(ours.activation_generator, name), getattr(theirs.activation_generator, name))
    assert torch.equal(ours.correlation_matrix.correlation_factor, theirs.correlation_matrix.correlation_factor)
    assert ours.hierarchy.to_dict() == theirs.hierarchy.to_dict()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        a = ours.activation_generator.sample(64)
        torch.manual_seed(1)
        assert torch.equal(a, theirs.activation_generator.sample(64))


def test_a_seed_is_required():
    with pytest.raises(ValueError, match="needs a seed"):
        SynthSAEBenchData("synthsaebench-1k", {**SMALL, "seed": None})


def test_batches_are_a_deterministic_stream_that_leaves_the_global_generator_alone(source):
    state = torch.get_rng_state()
    stream = source.batches(64)
    first = [next(stream) for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), state)
    assert first[0].shape == (64, 32) and source.d == 32
    assert not torch.equal(first[0], first[1])
    assert torch.equal(next(source.batches(64, start_step=2)), first[2])  # a resumed run sees the same batch
    assert torch.equal(source.sample(64, TRAIN_STREAM, 1)[0], first[1])
    assert not torch.equal(source.sample(64, EVAL_STREAM, 0)[0], first[0])
    again = SynthSAEBenchData("synthsaebench-1k", SMALL)
    assert torch.equal(next(again.batches(64)), first[0])
    other = SynthSAEBenchData("synthsaebench-1k", SMALL, stream_seed=5)
    assert torch.equal(other.ground_truth, source.ground_truth)  # the same model...
    assert not torch.equal(next(other.batches(64)), first[0])  # ...other samples


def test_samples_are_their_true_activations_through_the_features(source):
    x, acts = source.sample(500)
    assert acts.shape == (500, 256) and (acts >= 0).all()
    torch.testing.assert_close(x, acts @ source.ground_truth + source.bias, atol=1e-5, rtol=1e-5)
    assert source.ground_truth.norm(dim=1).sub(1).abs().max() < 1e-5
    assert 1 < (acts > 0).sum(1).float().mean() < 20


def test_held_out_samples_are_kept_and_a_prefix_of_more(source):
    n = EVAL_CHUNK + 300
    held = source.held_out(n)
    parts = list(held.batches())
    assert [len(x) for x, _ in parts] == [EVAL_CHUNK, 300]
    assert torch.equal(torch.cat([x for x, _ in parts]), held.vectors)
    assert torch.equal(source.eval_vectors(n), held.vectors)
    x, acts = parts[1]
    torch.testing.assert_close(x, acts @ source.ground_truth + source.bias, atol=1e-5, rtol=1e-5)
    fresh = SynthSAEBenchData("synthsaebench-1k", SMALL)
    more = fresh.held_out(2 * EVAL_CHUNK + 10)
    assert torch.equal(more.vectors[:n], held.vectors)
    assert torch.equal(list(more.batches())[1][1][:300], acts)
    assert torch.equal(fresh.held_out(100).vectors, held.vectors[:100])  # served from what was drawn


def test_without_sae_lens_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # import sae_lens raises ImportError
    with pytest.raises(MissingExtra, match=r"data.kind=synthsaebench needs sae_lens: pip install .*\[synth\]"):
        SynthSAEBenchData("synthsaebench-1k")


def test_sources_of_one_config_share_one_built_model(source):
    # a study's runs each make a source: the model (45 s to build at 16k) is built once per process
    again = SynthSAEBenchData("synthsaebench-1k", SMALL, stream_seed=7)
    assert again.model is source.model
    assert not torch.equal(again.sample(8)[0], source.sample(8)[0])  # the same model, another sample stream
    other = SynthSAEBenchData("synthsaebench-1k", {**SMALL, "bias": 0.25})
    assert other.model is not source.model and torch.allclose(other.bias.norm(), torch.tensor(0.25))
