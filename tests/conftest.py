"""Shared fixtures: tiny float64 models of every family, and the real embedded SmolLM2 (loaded once)."""
from __future__ import annotations

import pytest
import torch

import lensviz as lv
from tests import models

PROMPT = "I like Italy and France. I visited the city of"


@pytest.fixture(scope="session", autouse=True)
def model_cache(request, tmp_path_factory):
    """$LENSVIZ_CACHE for the whole run (and the kernels and processes it starts): the converted embedded
    model and the other lensviz caches go to a folder of this checkout that git ignores
    (.pytest_cache/d/lensviz-models, kept between runs, so only the first run converts), never the user's
    own cache; with pytest's cache provider off (-p no:cacheprovider), to the run's temporary folder."""
    from lensviz import cache

    store = getattr(request.config, "cache", None)
    folder = store.mkdir("lensviz-models") if store is not None else tmp_path_factory.mktemp("lensviz-models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cache.ENV, str(folder))
        yield folder


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return models.tokenizer()


@pytest.fixture(params=models.FAMILIES)
def tiny(request, tiny_tokenizer):
    """A Lens over a tiny float64 random model, one per family."""
    return lv.Lens(models.build(request.param), tiny_tokenizer)


@pytest.fixture(scope="session")
def smol(model_cache):
    """The embedded SmolLM2-135M-Instruct (float32), loaded once for the whole run."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return lv.load(progress=False)
