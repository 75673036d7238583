"""usae_core: the Universal Sparse Autoencoder library (no web, no database).

One-way flow: images -> backbones -> ActivationStore -> USAE (train) -> metrics + mining.
"""

from usae_core.config import TrainConfig, USAEConfig
from usae_core.errors import UsaeError
from usae_core.model import USAE
from usae_core.store import ActivationStore

__all__ = ["USAE", "USAEConfig", "TrainConfig", "ActivationStore", "UsaeError"]
__version__ = "0.1.0"
