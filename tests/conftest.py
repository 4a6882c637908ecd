"""Fixtures for every test: a fixed seed and an environment without ``MOE_GEMM_CHECK``."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_clean_env(monkeypatch):
    torch.manual_seed(0)
    # Tests that want the host-side size check set it themselves.
    monkeypatch.delenv("MOE_GEMM_CHECK", raising=False)
