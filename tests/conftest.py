"""Shared fixtures: the real SmolLM2 test model and small duo checkpoints made by duo-calibrate."""
from __future__ import annotations

from pathlib import Path

import pytest

from duo_vllm.calibrate.models import prepare_test_model

# Small calibration so the suite fits CI (2 cores): 8 windows of 256 tokens from the bundled C4 text.
TEST_NSAMPLES = 8
TEST_SEQLEN = 256


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return prepare_test_model()


@pytest.fixture(scope="session")
def duo_checkpoint(smollm2_dir, tmp_path_factory):
    """make(method, weight_sparsity, act_sparsity) -> checkpoint dir, calibrated once per session."""
    from duo_vllm.calibrate.api import calibrate
    from duo_vllm.format import DuoConfig

    made: dict[tuple, Path] = {}

    def make(method: str = "duogpt", weight_sparsity: float = 0.5, act_sparsity: float = 0.5) -> Path:
        key = (method, weight_sparsity, act_sparsity)
        if key not in made:
            out = tmp_path_factory.mktemp("ckpt") / f"{method}-w{weight_sparsity}-x{act_sparsity}"
            cfg = DuoConfig(method=method, weight_sparsity=weight_sparsity, act_sparsity=act_sparsity,
                            dataset="local:c4", nsamples=TEST_NSAMPLES, seqlen=TEST_SEQLEN)
            made[key] = calibrate(smollm2_dir, out, cfg, device="cpu")
        return made[key]

    return make
