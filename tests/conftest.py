import pytest
import torch

torch.set_num_threads(2)

# A small, easy synthetic problem: 64 true features in 32 dimensions, 3 active per sample.
EASY = ["data.d=32", "data.n_features=64", "data.n_groups=4", "data.n_active=3", "sae.d_sae=128",
        "sae.k=3", "train.batch_size=1000", "train.lr=3e-3", "eval.n_samples=5000",
        "train.checkpoint_every=0"]


@pytest.fixture
def easy_overrides() -> list[str]:
    return list(EASY)
