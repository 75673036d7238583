"""usae_core: the Universal Sparse Autoencoder library (no web, no database).

One-way flow: images -> backbones -> ActivationStore -> USAE (train) -> metrics + mining.
The names below are the pipeline's entry points, in that order (docs/python-api.md walks
through them); everything else lives in the submodules.
"""

from usae_core.backbones import create_backbone, default_backbones, store_backbones
from usae_core.cam import CamConfig, CamResult, coordinated_activation_maximization
from usae_core.config import TrainConfig, USAEConfig
from usae_core.demo_images import build_demo_set
from usae_core.errors import UsaeError
from usae_core.extract import extract_store
from usae_core.metrics import EvalResult, evaluate_usae
from usae_core.mining import DefectMasks, MiningConfig, MiningResult, mine_store, top_image_heatmaps
from usae_core.model import USAE
from usae_core.store import ActivationStore, import_activations
from usae_core.train import read_training_log, train_usae, trained_store

__all__ = [
    "UsaeError",
    # images and activations
    "build_demo_set", "create_backbone", "default_backbones", "store_backbones", "extract_store",
    "ActivationStore", "import_activations",
    # training
    "USAE", "USAEConfig", "TrainConfig", "train_usae", "trained_store", "read_training_log",
    # evaluation and mining
    "evaluate_usae", "EvalResult", "mine_store", "MiningConfig", "MiningResult", "DefectMasks", "top_image_heatmaps",
    # CAM
    "coordinated_activation_maximization", "CamConfig", "CamResult",
]
__version__ = "0.1.0"
