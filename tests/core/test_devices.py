"""resolve_device: every device= / --device value is checked in one place."""

from __future__ import annotations

import pytest
import torch

from usae_core.devices import resolve_device
from usae_core.errors import UsaeError


def test_auto_cpu_and_torch_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(UsaeError, match=r"--device cuda \(device='cuda'\) was asked for, but no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(UsaeError, match="unknown device 'gpu' "):
        resolve_device("gpu")


def test_a_gpu_number_beyond_the_machines_is_refused(monkeypatch):
    """cuda:1 on a one-GPU machine failed later, inside the first tensor moved to it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UsaeError, match=r"--device cuda:1 \(device='cuda:1'\): this machine has 1 CUDA device"):
        resolve_device("cuda:1")
