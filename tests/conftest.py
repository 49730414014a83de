"""Shared fixtures: tiny float64 models of every family, and the real embedded SmolLM2 (loaded once)."""
from __future__ import annotations

import pytest
import torch

import lensviz as lv
from tests import models

PROMPT = "I like Italy and France. I visited the city of"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return models.tokenizer()


@pytest.fixture(params=models.FAMILIES)
def tiny(request, tiny_tokenizer):
    """A Lens over a tiny float64 random model, one per family."""
    return lv.Lens(models.build(request.param), tiny_tokenizer)


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct (float32), loaded once for the whole run."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return lv.load(progress=False)
