"""The package's own names: the pipeline's entry points import from `usae_core` itself."""

from __future__ import annotations

import subprocess
import sys

import usae_core
from usae_core import backbones, cam, config, demo_images, errors, extract, metrics, mining, model, store, train

HOMES = (backbones, cam, config, demo_images, errors, extract, metrics, mining, model, store, train)


def test_every_exported_name_is_the_submodules_own_object():
    """A notebook wrote `from usae_core.train import train_usae`, `from usae_core.metrics import
    evaluate_usae`, ... for every step: only five names were exported."""
    for name in ("train_usae", "evaluate_usae", "mine_store", "extract_store", "build_demo_set", "create_backbone",
                 "store_backbones", "coordinated_activation_maximization", "CamConfig", "MiningConfig",
                 "DefectMasks", "trained_store", "import_activations"):
        assert name in usae_core.__all__, name
    for name in usae_core.__all__:
        homes = [module for module in HOMES if getattr(module, name, None) is not None]
        assert homes, f"{name} is defined in none of the submodules"
        assert all(getattr(usae_core, name) is getattr(home, name) for home in homes), name
    assert len(set(usae_core.__all__)) == len(usae_core.__all__)


def test_star_import_gives_the_exports_without_loading_the_backbone_families():
    """The families (timm, torchvision, transformers) and the photo packages stay unloaded until a
    backbone or the demo set is built."""
    code = ("import sys\nns = {}\nexec('from usae_core import *', ns)\n"
            "import usae_core\nassert sorted(k for k in ns if not k.startswith('__')) == sorted(usae_core.__all__)\n"
            "print(sorted(m for m in ('timm', 'torchvision', 'transformers', 'skimage', 'sklearn', 'matplotlib')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
