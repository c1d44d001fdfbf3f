"""The absorption metric: SAEBench's own functions agree with ours on shared inputs (when sae-bench is
installed: `pip install --no-deps sae-bench==0.6.0`), a hand-made absorption is found, a model that knows no
letters is "not measurable", and scikit-learn's absence is the one-line error."""

import json
import math
import random
import sys
import types

import pytest
import torch

from mfr_sae import absorption_probes as probes
from mfr_sae import absorption_prompts as prompts
from mfr_sae import absorption_scores as scores
from mfr_sae.absorption import LetterProbe, absorption, letter_probe
from mfr_sae.data.lm_model import load_model
from mfr_sae.data.vectors import DataError
from mfr_sae.extras import MissingExtra

# word -> (probe projection of its activation, {latent: activation}); main latents 0 and 1
# decoder cosines with the probe: 0: 1, 1: 0.8, 2: 0.9, 3: 0.5, 4: 0.05, 5: -0.5, 6: 0.3, 7: 0.2, 8-11: 0
COSINES = [1.0, 0.8, 0.9, 0.5, 0.05, -0.5, 0.3, 0.2, 0.0, 0.0, 0.0, 0.0]
MAIN = [0, 1]
WORDS = {
    "main": (2.0, {0: 2.0}),  # the main latent carries it all: 0
    "absorbed": (1.8, {2: 2.0}),  # an aligned latent instead of the main ones: 1, full absorption
    "partial": (1.6, {0: 0.5, 2: 1.0}),  # 0.9 / (0.9 + 0.5)
    "weak": (1.0, {0: 0.2, 3: 0.4}),  # absorbers carry 0.2 < 0.4 of it: 0
    "unaligned": (1.0, {4: 10.0}),  # full absorption by a latent of cosine 0.05, fraction 0 (cosine < 0.1)
    "negative": (-0.5, {5: 1.0}),  # probe projection < 0: neither
    "four": (1.5, {1: 0.25, 2: 0.5, 3: 1.0, 6: 1.0, 7: 1.0}),  # the 3 largest of 4 absorbers: 1.25 / 1.45
    "capped": (2.0, {0: 1.0, 2: 2.0}),  # absorbers (1.8) capped at the unaccounted 1.0: 0.5
    "share": (1.0, {2: 0.3, 3: 0.4}),  # fraction 1, but the top latent's share 0.27 < 0.4: not full
}
EXPECTED = {"main": 0.0, "absorbed": 1.0, "partial": 0.9 / 1.4, "weak": 0.0, "unaligned": 0.0, "negative": 0.0}
EXPECTED |= {"four": 1.25 / 1.45, "capped": 0.5, "share": 1.0}
FULL = {"absorbed", "unaligned"}


def _synthetic():
    """(acts [n, 16], latents [n, 12], probe direction, decoder [12, 16]): probe along e0, decoder row j at
    cosine COSINES[j] to it (rows of norm 2: cosines, not dot products, are used), each word's activation unique."""
    d = 16
    decoder = torch.zeros(len(COSINES), d)
    for j, c in enumerate(COSINES):
        decoder[j, 0], decoder[j, j + 1] = c, math.sqrt(1 - c * c)
    decoder *= 2
    acts = torch.zeros(len(WORDS), d)
    latents = torch.zeros(len(WORDS), len(COSINES))
    for i, (total, fired) in enumerate(WORDS.values()):
        acts[i, 0], acts[i, 15] = total, 0.1 * i
        for j, a in fired.items():
            latents[i, j] = a
    return acts, latents, torch.tensor([3.0] + [0.0] * (d - 1)), decoder


def test_word_absorption_of_each_case():
    acts, latents, direction, decoder = _synthetic()
    fractions, full = scores.word_absorption(acts, latents, direction, decoder, MAIN)
    assert fractions == pytest.approx([EXPECTED[w] for w in WORDS], abs=1e-6)
    assert full == [w in FULL for w in WORDS]


def test_word_absorption_matches_saebench():
    calc = pytest.importorskip("sae_bench.evals.absorption.feature_absorption_calculator")
    acts, latents, direction, decoder = _synthetic()

    class Sae:  # SAEBench reads sae.device, sae.W_dec and sae.encode; encode looks the word's latents up
        device, W_dec = torch.device("cpu"), decoder

        def encode(self, x):
            return latents[torch.cdist(x, acts).argmin(dim=1)]

    class Model:  # the activation of each prompt's word, at every position
        def to_tokens(self, text):
            return torch.zeros(1, 8)

        def run_with_cache(self, texts, names_filter):
            rows = [list(WORDS).index(t.splitlines()[-1].split(" ")[0]) for t in texts]
            return None, {names_filter[0]: acts[rows][:, None, :].expand(-1, 8, -1)}

    fillers = [f"w{i}" for i in range(20)]
    theirs = calc.FeatureAbsorptionCalculator(
        model=Model(), icl_word_list=fillers, max_icl_examples=10, base_template=prompts.TEMPLATE, word_token_pos=-6
    ).calculate_absorption(Sae(), list(WORDS), direction, MAIN, layer=0, show_progress=False)
    fractions, full = scores.word_absorption(acts, latents, direction, decoder, MAIN)
    assert fractions == pytest.approx([float(r.absorption_fraction) for r in theirs.word_results], abs=1e-6)
    assert full == [r.is_full_absorption for r in theirs.word_results]
    assert {0.0, 1.0} <= set(fractions) and any(0 < f < 1 for f in fractions) and set(full) == {True, False}


def test_prompts_and_split_match_saebench(tiny_gpt2):
    probing = pytest.importorskip("sae_bench.evals.absorption.probing")
    vocab_module = pytest.importorskip("sae_bench.evals.absorption.vocab")
    from sae_bench.evals.absorption.prompting import first_letter_formatter

    _, tokenizer = load_model(str(tiny_gpt2[0]))
    vocab = prompts.alpha_vocab(tokenizer)
    assert sorted(vocab) == sorted(vocab_module.get_alpha_tokens(tokenizer))
    random.seed(5)
    train, test = probing.create_dataset_probe_training(vocab, first_letter_formatter(), 1, prompts.TEMPLATE)
    rng = random.Random(5)
    ours_train, ours_test = prompts.split_vocab(vocab, rng)
    ours = [prompts.icl_prompt(w, ours_train, rng) for w in ours_train]
    ours += [prompts.icl_prompt(w, ours_test, rng) for w in ours_test]
    assert ours == [p.base for p, _ in train + test]
    assert [prompts.letter_index(w) for w in ours_train + ours_test] == [c for _, c in train + test]


def test_word_position_is_the_words_last_token(tiny_gpt2):
    _, tokenizer = load_model(str(tiny_gpt2[0]))
    vocab = prompts.alpha_vocab(tokenizer)
    rng = random.Random(0)
    rest = tokenizer.decode(tokenizer(" has the first letter:", add_special_tokens=False)["input_ids"])
    for word in vocab[::10]:
        ids, pos = prompts.tokenize(tokenizer, prompts.icl_prompt(word, vocab, rng))
        assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1 : pos + 1]).endswith("\n" + word)
        assert tokenizer.decode(ids[pos + 1 :]) == rest  # this tokenizer has no ":"


def _letter_data(seed=0, n_test=20, n_a=80):
    """Activations [n, 32] of words of 26 letters, 20 training words each: letter l along e_l (1 to 1.5);
    the other letters have n_test test words each, 'a' n_a, of
    which 2 carry flag e26 (absorbed) and 1 flag e27 (partly absorbed): the absorber is a latent of those test
    words (tokens), so it never fires on a training word; half the words of 'b' carry flag e28 (the letter split
    in two latents); dims 29-31 are noise."""
    gen = torch.Generator().manual_seed(seed)

    def words(letter, n):
        x = torch.zeros(n, 32)
        x[:, letter] = 1 + 0.5 * torch.rand(n, generator=gen)
        x[:, 29:] = 0.3 * torch.randn(n, 3, generator=gen)
        x[::2, 28] = float(letter == 1)
        return x

    train = torch.cat([words(i, 20) for i in range(26)])
    test = torch.cat([words(0, n_a)] + [words(i, n_test) for i in range(1, 26)])
    test[:3, 0], test[0:2, 26], test[2, 27] = 1.0, 1.0, 1.0
    test_letters = torch.cat([torch.zeros(n_a, dtype=torch.long), torch.arange(1, 26).repeat_interleave(n_test)])
    return train, torch.arange(26).repeat_interleave(20), test, test_letters


class HandSae:
    """Latent l < 26 reads letter l above 0.5, off where flag e26 is set and halved where flag e27 is; latent 26,
    decoder row e0, takes letter 'a' on those words instead: the absorber; latent 27, decoder row e1, takes 'b'
    from latent 1 where flag e28 is set: a split. Latents 28.. never fire: as in a wide SAE, the L1 probe's
    initial weights (uniform, +-1/sqrt(h)) are then small beside what its 50 steps learn."""

    def __init__(self, h=1024):
        self.W_dec = torch.nn.functional.normalize(
            torch.randn(h, 32, generator=torch.Generator().manual_seed(0)), dim=1
        )
        self.W_dec[:28] = torch.eye(28, 32)
        self.W_dec[26], self.W_dec[27] = self.W_dec[0], self.W_dec[1]

    def encode(self, x):
        gate = (1 - x[:, 26:27]) * (1 - 0.5 * x[:, 27:28])
        z = torch.relu(x[:, :26] - 0.5) * gate
        absorber = (x[:, 0] * (x[:, 26] + 0.75 * x[:, 27]))[:, None]
        split = z[:, 1:2] * x[:, 28:29]
        z[:, 1:2] -= split
        return torch.cat([z, absorber, split, torch.zeros(len(x), len(self.W_dec) - 28)], dim=1)


def test_hand_made_absorption_is_found():
    pytest.importorskip("sklearn")
    train, train_letters, test, test_letters = _letter_data()
    weight, bias = 4 * torch.eye(26, 32), -2 * torch.ones(26)  # a letter's logit > 0 where its coordinate > 0.5
    f1 = probes.letter_f1(test @ weight.T + bias, test_letters)
    probe = LetterProbe(
        "blocks.0.hook_resid_post",
        0,
        600,
        train,
        train_letters,
        test,
        test_letters,
        weight,
        bias,
        dict(zip(prompts.LETTERS, f1)),
        [f"w{i}" for i in range(len(test))],
        test,
        test_letters,
    )
    result = absorption(HandSae(), probe)
    json.dumps(result, allow_nan=False)
    a = result["letters"]["a"]
    assert a["split_feats"] == [0]  # the absorber, unseen in training, is no split
    assert a["num_probe_true_positives"] == 80 and a["num_full_absorption"] == 2
    assert a["mean_absorption_fraction"] == pytest.approx((2 + 0.75) / 80)
    assert sorted(result["letters"]["b"]["split_feats"]) == [1, 27]  # both halves of the split are main latents
    others = list(result["letters"].values())[1:]
    assert all(r["mean_absorption_fraction"] == 0 and r["num_full_absorption"] == 0 for r in others)
    assert [r["split_feats"] for r in others[1:]] == [[i] for i in range(2, 26)]
    assert result["mean_absorption_fraction_score"] == pytest.approx((2 + 0.75) / 80 / 26)
    assert result["mean_full_absorption_score"] == pytest.approx(2 / 80 / 26)
    assert result["mean_num_split_features"] == pytest.approx(27 / 26) and result["letters_passing"] == 26


def test_main_latents_match_saebench(monkeypatch):
    ksp = pytest.importorskip("sae_bench.evals.absorption.k_sparse_probing")
    from sae_bench.evals.absorption.probing import LinearProbe

    # SAEBench scores each test word in a Python loop: few of them
    train, train_letters, test, test_letters = _letter_data(seed=1, n_test=4, n_a=12)
    sae = HandSae()
    train_z, test_z = sae.encode(train), sae.encode(test)
    sparse = probes.sparse_probe(train_z, train_letters, seed=0, progress=False)
    ours = [probes.main_latents(sparse, i, (train_z, train_letters), (test_z, test_letters)) for i in range(26)]

    def their_l1_probe(*_args, **_kwargs):  # SAEBench's L1 probe is unseeded: it is handed ours
        probe = LinearProbe(*sparse.shape[::-1])
        probe.fc.weight.data = sparse.clone()
        return probe

    monkeypatch.setattr(ksp, "train_sparse_multi_probe", their_l1_probe)
    encoder = types.SimpleNamespace(
        device=torch.device("cpu"), dtype=torch.float32, cfg=types.SimpleNamespace(d_sae=1024)
    )
    encoder.encode, encoder.W_enc, encoder.W_dec = sae.encode, sae.W_dec.T, sae.W_dec
    names = lambda letters: [(f"w{i}", int(c)) for i, c in enumerate(letters)]  # noqa: E731
    # k = 1..3 is enough here: every letter's selection stops before k = 3 (asserted), and SAEBench's k-probe
    # metrics cost seconds a k
    assert max(len(m) for m in ours) == 2
    k_probes = ksp.train_k_sparse_probes(encoder, names(train_letters), train, ks=range(1, 4), precalc_sae_acts=True)
    gt = LinearProbe(32, 26)
    gt.fc.weight.data, gt.fc.bias.data = 4 * torch.eye(26, 32), -2 * torch.ones(26)
    raw = ksp.eval_probe_and_sae_k_sparse_raw_scores(encoder, gt, k_probes, names(test_letters), test)
    meta = ksp.sae_k_sparse_metadata(encoder, gt, k_probes, sae_name="hand", layer=0)
    metrics = ksp.build_metrics_df(raw, meta, max_k_value=3)
    ksp.add_feature_splits_to_metrics_df(metrics, max_k_value=3)
    assert ours == [list(f) for f in metrics["split_feats"]]
    assert probes.letter_f1(test @ gt.weights.detach().T + gt.biases.detach(), test_letters) == pytest.approx(
        list(metrics["f1_probe"])
    )


def test_model_knowing_no_letters_is_not_measurable(tiny_gpt2, tiny_gpt2_256):
    model, tokenizer = load_model(str(tiny_gpt2[0]))
    with pytest.raises(DataError, match="exceed the model's context of 64"):
        letter_probe(model, tokenizer, "blocks.1.hook_resid_post", n_words=None)
    model, tokenizer = load_model(str(tiny_gpt2_256[0]))  # the prompts (~200 tokens here) need more positions
    probe = letter_probe(model, tokenizer, "blocks.1.hook_resid_post", n_words=None, seed=0)  # its 131 words
    sae = types.SimpleNamespace(W_dec=torch.randn(16, 32), encode=lambda x: torch.relu(x @ torch.randn(32, 16)))
    result = absorption(sae, probe)
    assert result["measurable"] is False and result["letters_passing"] < 20
    assert len(result["letter_f1"]) == 26 and "SAEBench needs 20" in result["reason"]
    json.dumps(result, allow_nan=False)


def test_missing_sklearn_is_the_extras_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    z, letters = torch.rand(52, 4), torch.arange(26).repeat(2)
    with pytest.raises(MissingExtra, match=r"needs sklearn: pip install .*\[evals\]"):
        probes.main_latents(torch.rand(26, 4), 0, (z, letters), (z, letters))
