"""mfr-sae: TopK sparse autoencoder ensembles trained with Mutual Feature Regularization."""

from mfr_sae.checkpoint import load
from mfr_sae.config import RunConfig, load_config
from mfr_sae.ensemble import Ensemble
from mfr_sae.train import Trainer, resume, train

__all__ = ["Ensemble", "RunConfig", "Trainer", "load", "load_config", "resume", "train"]
__version__ = "0.1.0"
