import errno
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

# A small, easy synthetic problem: 64 true features in 32 dimensions, 3 active per sample.
EASY = [
    "data.d=32",
    "data.n_features=64",
    "data.n_groups=4",
    "data.n_active=3",
    "sae.d_sae=128",
    "sae.k=3",
    "train.batch_size=1000",
    "train.lr=3e-3",
    "eval.n_samples=5000",
    "train.checkpoint_every=0",
]


@pytest.fixture
def easy_overrides() -> list[str]:
    return list(EASY)


@pytest.fixture
def perturbed_ensemble():
    """make(tied, decoder_bias): a float64 ensemble of 2 members (d 8, h 20, k 2 and 3), its weights and biases
    moved off their initialisation by the global generator seeded 0 (tests draw their inputs after it)."""
    from mfr_sae.ensemble import Ensemble

    def make(tied: bool, decoder_bias: bool) -> Ensemble:
        torch.manual_seed(0)
        ensemble = Ensemble(8, 20, [2, 3], tied, decoder_bias).double()
        with torch.no_grad():
            for param in ensemble.parameters():
                param.add_(0.1 * torch.randn_like(param))
        return ensemble

    return make


@pytest.fixture
def trained_like():
    """make(tied=True): 2 members (d 6, h 10, k 2 and 4, a decoder bias, seed 3) whose biases are drawn from the
    global generator, as a trained ensemble's are not zero (tests/test_checkpoint.py, tests/test_digests.py)."""
    from mfr_sae.ensemble import Ensemble

    def make(tied=True):
        ens = Ensemble(6, 10, [2, 4], tied=tied, decoder_bias=True, seed=3)
        with torch.no_grad():
            ens.b_enc.normal_()
            ens.b_dec.normal_()
        return ens

    return make


@pytest.fixture
def kernel_inputs():
    """make(n, b, d, h, seed): float64 inputs of the kernels, each requiring a gradient: x [b, d], an encoder weight
    [n, h, d], its bias [n, h] and a decoder weight [n, h, d], drawn from a generator seeded `seed`."""

    def make(n=3, b=17, d=6, h=11, seed=0):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(b, d, generator=gen, dtype=torch.float64, requires_grad=True)
        w = torch.randn(n, h, d, generator=gen, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(n, h, generator=gen, dtype=torch.float64, requires_grad=True)
        dec = torch.randn(n, h, d, generator=gen, dtype=torch.float64, requires_grad=True)
        return x, w, bias, dec

    return make


@pytest.fixture
def full_checkpoint(trained_like):
    """save(run_dir, seed=3): a checkpoint with every kind of file: each member's cfg.json, weights and sparsity,
    the trainer state (seed 3: `trained_like()`'s members); returns the ensemble it saved."""
    from mfr_sae.checkpoint import save_checkpoint
    from mfr_sae.ensemble import Ensemble

    def save(run_dir, seed=3):
        ens = trained_like() if seed == 3 else Ensemble(6, 10, [2, 4], decoder_bias=True, seed=seed)
        state = {"optimizer.W_enc.exp_avg": torch.randn(2, 10, 6), "optimizer.W_enc.step": torch.tensor(3.0)}
        save_checkpoint(run_dir, ens, state, {"step": 3}, firing_prob=torch.rand(2, 10))
        return ens

    return save


@pytest.fixture
def flip_byte():
    """Flip one bit of a file's 4th byte from the end: a safetensors file stays readable (a mantissa bit of
    its last value), so that only its SHA-256 can tell."""

    def flip(path):
        data = bytearray(path.read_bytes())
        data[-4] ^= 0x01
        path.write_bytes(bytes(data))

    return flip


@pytest.fixture
def full_disk(monkeypatch):
    """`full_disk(when, error)`: the checkpoint's safetensors writer fails as on a full disk for each file where
    `when(path)` holds: it writes a few of the file's bytes, then raises `error` (by default ENOSPC)."""
    from mfr_sae import checkpoint

    real = checkpoint.save_file

    def arm(when, error=None):
        def save_file(tensors, filename, metadata=None):
            if when(Path(filename)):
                Path(filename).write_bytes(b"\0" * 64)
                raise error or OSError(errno.ENOSPC, "No space left on device")
            real(tensors, filename, metadata=metadata)

        monkeypatch.setattr(checkpoint, "save_file", save_file)

    return arm


WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sees",
    "runs",
    "over",
    "under",
    "model",
    "feature",
    "sparse",
    "learns",
    "data",
    "token",
    "layer",
    "small",
    "big",
    "red",
    "blue",
    "green",
    "quick",
    "slow",
    "and",
    "or",
    "but",
    "with",
    "from",
    "into",
]


def write_corpus(path, n_docs=400, seed=0):
    """A deterministic toy English-like corpus, one document per line."""
    import random

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) + "." for _ in range(n_docs)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def cache_command(tiny_gpt2):
    """`mfr-sae cache` of the tiny GPT-2's activations at a hook over its corpus, as main() takes it."""
    model_dir, corpus = tiny_gpt2

    def command(hook: str, out: Path, tokens: int, context: int) -> list[str]:
        args = ["cache", "--model", str(model_dir), "--hook", hook, "--text", str(corpus), "--out", str(out)]
        return args + ["--tokens", str(tokens), "--context", str(context), "--no-progress"]

    return command


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A tiny GPT-2 with random weights and a BPE tokenizer trained here, saved with save_pretrained."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("lm")
    corpus = write_corpus(root / "corpus.txt")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(corpus)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=eot, eos_token_id=eot
    )
    model = GPT2LMHeadModel(config)
    # a few hundred steps on the corpus, so that the layer-0 MLP matters to the loss (random weights don't)
    ids = torch.tensor(tokenizer(corpus.read_text())["input_ids"])
    ids = ids[: len(ids) // 32 * 32].view(-1, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        batch = ids[torch.randint(len(ids), (16,))]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model_dir = root / "tiny-gpt2"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, corpus


def _longer_positions(model, n_positions: int) -> None:
    """Give a GPT-2 `n_positions` positions, the first ones its own: SAEBench's letter prompts (~200 tokens on the
    tiny tokenizer) need more than the tiny GPT-2's 64."""
    from torch import nn

    wpe = model.transformer.wpe
    model.transformer.wpe = nn.Embedding(n_positions, wpe.embedding_dim)
    model.transformer.wpe.weight.data[: wpe.num_embeddings] = wpe.weight.data
    model.config.n_positions = n_positions


@pytest.fixture(scope="session")
def tiny_gpt2_256(tiny_gpt2, tmp_path_factory):
    """The tiny GPT-2 with 256 positions (_longer_positions), saved in a folder of its own; the same corpus."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model_dir, corpus = tiny_gpt2
    model = GPT2LMHeadModel.from_pretrained(model_dir)
    _longer_positions(model, 256)
    out = tmp_path_factory.mktemp("lm256") / "tiny-gpt2-256"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out, corpus


def _raise_at(trainer, step, error) -> None:
    """Make the trainer raise `error` when it is about to run step `step`."""
    original = trainer.train_step

    def step_or_raise(*args):
        if trainer.step == step:
            raise error
        return original(*args)

    trainer.train_step = step_or_raise


@pytest.fixture
def raise_at():
    """`raise_at(trainer, step, error)`: the trainer raises `error` when it is about to run step `step`."""
    return _raise_at


@pytest.fixture
def cut_and_resumed():
    """`cut_and_resumed(overrides, run_dir, step)`: train a run that a Ctrl-C stops at `step`, then `--resume` it;
    returns (the Trainer that was cut, the resumed run's results)."""
    from mfr_sae.config import load_config
    from mfr_sae.train import Trainer, resume

    def run(overrides, run_dir, step):
        trainer = Trainer(load_config(None, overrides), run_dir, progress=False)
        _raise_at(trainer, step, KeyboardInterrupt)
        with pytest.raises(Exception, match="resume"):
            trainer.fit()
        return trainer, resume(run_dir, progress=False)

    return run
