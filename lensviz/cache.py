"""The user cache of converted GGUF models: the de-quantised weights (safetensors), config and tokenizer,
so that a second `lv.load()` of the same GGUF file reads them instead of converting it again.

Where: `$LENSVIZ_CACHE`, else the platform's user cache folder (~/.cache/lensviz, $XDG_CACHE_HOME/lensviz,
~/Library/Caches/lensviz, %LOCALAPPDATA%/lensviz/Cache). One entry per (GGUF file's sha256, lensviz version,
transformers version), a folder `gguf/<stem>-<key>/`. An entry appears whole or not at all (written into
a temporary folder, then renamed); its `entry.json` lists each file's size and, for all but the
weights, its sha256 (the weights are checked by size and by their safetensors header, which must
account for every byte). A damaged entry is removed and rebuilt with a `CacheWarning`; a cache
folder that cannot be written gives one `CacheWarning` and the model is converted as without a cache.

`read(entry)` is the second load: the model built from the entry's config with initialisation off and the
memory-mapped safetensors assigned to it (no `from_pretrained`), bit-identical to what `from_pretrained`
gives. The GGUF file's sha256 is remembered by its stat in `<cache>/sha256.json`, so a later process does
not hash it again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import time
import warnings
from pathlib import Path

ENV = "LENSVIZ_CACHE"
FORMAT = 1
MANIFEST = "entry.json"
WEIGHTS = "model.safetensors"
HASHES = "sha256.json"         # in the cache folder: each GGUF file's sha256 by its stat, read by later processes
_HASHES_KEPT = 32
_HASHED_LIMIT = 64 << 20       # files up to this size are checked by sha256 on every load
_STALE_TMP_S = 3600            # temporary folders older than this are a crashed writer's leftovers
_warned: set[str] = set()      # cache roots already warned about in this process
_digests: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256, so one process hashes a file once


class CacheWarning(UserWarning):
    """The model cache could not be used as it is (damaged entry rebuilt, or folder not writable)."""


def root() -> Path:
    """The cache folder: $LENSVIZ_CACHE if set, else the platform's per-user cache folder + lensviz."""
    env = os.environ.get(ENV, "").strip()
    if env:
        return Path(env).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / "lensviz" / "Cache"
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "lensviz"
    return Path(os.environ.get("XDG_CACHE_HOME", "").strip() or home / ".cache") / "lensviz"


def versions() -> dict[str, str]:
    """The versions that decide whether a converted model can be reused."""
    import transformers

    from .version import __version__

    return {"lensviz": __version__, "transformers": transformers.__version__}


def file_sha256(path: str | os.PathLike, remember: bool = False) -> str:
    """sha256 of a file; with `remember`, kept per (path, size, modification time) for this process."""
    st = os.stat(path)
    memo = (os.fspath(path), st.st_size, st.st_mtime_ns)
    if not remember or memo not in _digests:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if not remember:
            return digest
        _digests[memo] = digest
    return _digests[memo]


def gguf_sha256(gguf: str | os.PathLike, folder: str | os.PathLike | None = None) -> str:
    """sha256 of a GGUF file, remembered per (absolute path, size, modification time, inode) in this process and
    across processes in the cache folder's `sha256.json`, so a later load reads a small JSON file instead of
    hashing the whole GGUF file again (a file that changes gets a new stat and is hashed again)."""
    path = os.path.abspath(gguf)
    st = os.stat(path)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    if (path, st.st_size, st.st_mtime_ns) in _digests:
        return _digests[(path, st.st_size, st.st_mtime_ns)]
    book_path = Path(folder or root()) / HASHES
    book = _read_hashes(book_path)
    known = book.get(path)
    if isinstance(known, dict) and known.get("stat") == stamp and isinstance(known.get("sha256"), str):
        _digests[(path, st.st_size, st.st_mtime_ns)] = known["sha256"]
        return known["sha256"]
    digest = file_sha256(path, remember=True)
    book = {k: v for k, v in book.items() if k != path and os.path.exists(k)}
    book = dict(list(book.items())[-(_HASHES_KEPT - 1):])
    book[path] = {"stat": stamp, "sha256": digest}
    try:
        book_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(book_path, json.dumps(book, indent=1).encode())
    except OSError:
        pass                                   # an unwritable cache: store() says so, once
    return digest


def _read_hashes(path: Path) -> dict:
    try:
        book = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return book if isinstance(book, dict) else {}


def entry_path(gguf: str | os.PathLike, folder: str | os.PathLike | None = None) -> tuple[Path, dict]:
    """(the entry folder for this GGUF file, the facts its manifest must hold)."""
    facts = {"format": FORMAT, "gguf_sha256": gguf_sha256(gguf, folder), **versions()}
    key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder or root()) / "gguf" / f"{Path(gguf).stem}-{key}", facts


def lookup(gguf: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path | None:
    """The checked cache entry of this GGUF file, or None (a miss). A damaged entry is removed (it is
    rebuilt by `store`) with a CacheWarning saying what was wrong."""
    entry, facts = entry_path(gguf, folder)
    try:
        if not entry.is_dir():
            return None
    except OSError:
        return None
    problem = check(entry, facts)
    if problem is None:
        return entry
    warnings.warn(f"lensviz: the cached conversion of {Path(gguf).name} is damaged ({problem}); converting the "
                  f"GGUF file again and rebuilding the entry in {entry.parent}", CacheWarning, stacklevel=3)
    shutil.rmtree(entry, ignore_errors=True)
    return None


def check(entry: Path, facts: dict) -> str | None:
    """None when the entry is whole and belongs to `facts`, else what is wrong with it."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST}: {type(e).__name__}"
    if any(manifest.get(k) != v for k, v in facts.items()):
        return f"{MANIFEST} belongs to another file or version"
    if WEIGHTS not in files or "config.json" not in files:
        return f"{MANIFEST} lists no weights or config"
    for name, meta in files.items():
        path = entry / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != meta.get("size"):
            return f"{name} has {size} bytes, expected {meta.get('size')} (truncated or overwritten)"
        if meta.get("sha256") is not None and file_sha256(path) != meta["sha256"]:
            return f"{name} does not match its sha256"
    return _check_safetensors(entry / WEIGHTS)


def _check_safetensors(path: Path) -> str | None:
    """The safetensors header parses and its tensors end exactly at the end of the file."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        return f"{WEIGHTS} has a broken header ({type(e).__name__})"
    if 8 + n + end != path.stat().st_size:
        return f"{WEIGHTS}: its header accounts for {8 + n + end} bytes, the file has {path.stat().st_size}"
    return None


def read(entry: Path):
    """(model in eval mode, tokenizer) from a checked entry without `from_pretrained`, or None when this
    entry cannot be read that way (the caller then loads it with `from_pretrained`, slower, same result).

    The model class named in config.json is built from that config with weight initialisation off (its
    parameters are uninitialised until replaced), the safetensors tensors (memory-mapped, copy-on-write) are
    assigned in their place, tied weights are tied again and every parameter and buffer of the state dict
    is checked to come from the file. The model and tokenizer classes are those of the converted model the
    entry was written from (recorded in its manifest). float32, CPU, as the entry holds it."""
    import torch
    import transformers
    from safetensors.torch import load_file

    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        classes, added = manifest["classes"], manifest.get("added_tokens")
        config_dict = json.loads((entry / "config.json").read_text(encoding="utf-8"))
        model_class = getattr(transformers, classes["model"])
        tokenizer_class = getattr(transformers, classes["tokenizer"])
        no_init = _no_init_weights()
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError):
        return None                             # an entry from before the classes were recorded, or a custom class
    if (not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel))
            or not isinstance(tokenizer_class, type) or no_init is None
            or config_dict.get("architectures") != [model_class.__name__] or config_dict.get("dtype") != "float32"):
        return None
    try:
        config = model_class.config_class.from_dict(config_dict)
        config.name_or_path = str(entry)        # as from_pretrained leaves it
        with no_init():
            model = model_class._from_config(config, dtype=torch.float32)   # what AutoModel.from_config calls
    except (AttributeError, TypeError):         # a transformers without these: from_pretrained instead
        return None
    weights = load_file(entry / WEIGHTS, **({"backend": "pread"} if sys.platform == "win32" else {}))
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if unexpected:
        return None
    if missing:
        model.tie_weights()
    loaded = {t.data_ptr() for t in weights.values()}
    if any(t.data_ptr() not in loaded or t.dtype != torch.float32 for t in model.state_dict().values()):
        return None                             # something was neither in the file nor tied to it
    if model.can_generate() and (entry / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(entry)
    model.eval()
    extra = {}
    if isinstance(added, list):   # what from_pretrained would otherwise parse the whole tokenizer.json for
        from tokenizers import AddedToken

        extra["added_tokens_decoder"] = {t["id"]: AddedToken(**{k: v for k, v in t.items() if k != "id"})
                                         for t in added}
    return model, tokenizer_class.from_pretrained(entry, **extra)


def _added_tokens(folder: Path) -> list | None:
    """The added tokens of the tokenizer.json in `folder` (as it lists them), or None without one."""
    try:
        return json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _no_init_weights():
    """transformers' context manager that turns weight initialisation off (its home moved in 5.x)."""
    import importlib

    for home in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            found = getattr(importlib.import_module(home), "no_init_weights", None)
        except ImportError:
            continue
        if found is not None:
            return found
    return None


def store(gguf: str | os.PathLike, model, tokenizer, folder: str | os.PathLike | None = None) -> Path | None:
    """Write the converted `model` (float32, on CPU) and `tokenizer` of this GGUF file as a cache entry;
    returns its folder, or None when it cannot be written (one CacheWarning per cache folder)."""
    entry, facts = entry_path(gguf, folder)
    tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        files = _write(tmp, model, tokenizer)
        manifest = {**facts, "gguf": Path(gguf).name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "classes": {"model": type(model).__name__, "tokenizer": type(tokenizer).__name__},
                    "added_tokens": _added_tokens(tmp), "files": files}
        _atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        try:
            os.rename(tmp, entry)              # atomic: the entry is whole or absent
        except OSError:
            if check(entry, facts) is not None:  # not another process's finished entry
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as e:                     # noqa: BLE001  (a cache must never break loading)
        shutil.rmtree(tmp, ignore_errors=True)
        _warn_once(entry.parent.parent, e)
        return None
    _prune(entry, facts)
    return entry


def _write(tmp: Path, model, tokenizer) -> dict:
    """Weights, config, generation config and tokenizer files into `tmp`; returns the manifest's file table."""
    import torch
    from safetensors.torch import save_file

    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    tensors, views, storages = {}, set(), set()
    for key, value in model.state_dict().items():
        if value.device.type != "cpu" or value.dtype != torch.float32:
            raise ValueError(f"only a float32 CPU model is cached ({key} is {value.dtype} on {value.device})")
        view = (value.data_ptr(), tuple(value.shape), value.stride())
        storage = value.untyped_storage().data_ptr()
        if view in views and tied:
            continue                            # a tied copy: from_pretrained ties it again from the config
        shared = storage in storages
        views.add(view)
        storages.add(storage)
        tensors[key] = value.detach().clone() if shared else value.detach().contiguous()
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    config = model.config.to_dict()
    for key in [k for k in config if k.startswith("_") or k == "quantization_config"]:
        config.pop(key)                        # no absolute source path, no GGUF quantisation marker
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    _atomic_write(tmp / "config.json", json.dumps(config, indent=1, sort_keys=True).encode())
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    files = {}
    for path in sorted(tmp.iterdir()):
        size = path.stat().st_size
        files[path.name] = {"size": size, "sha256": None if path.name == WEIGHTS or size > _HASHED_LIMIT
                            else file_sha256(path)}
    return files


def _atomic_write(path: Path, data: bytes) -> None:
    """`path` holds `data` whole, or what it held before (a temporary file in the same folder, then renamed)."""
    part = path.with_name(f"{path.name}.{os.getpid()}-{os.urandom(4).hex()}.part")   # one per writer
    with open(part, "wb") as f:
        f.write(data)
    os.replace(part, path)


def _prune(entry: Path, facts: dict) -> None:
    """Remove entries of the same GGUF file made by other versions, and old crashed temporary folders."""
    stem = entry.name.rsplit("-", 1)[0]
    try:
        siblings = list(entry.parent.glob(f"{stem}-*")) + list(entry.parent.glob(f".tmp-{stem}-*"))
    except OSError:
        return
    for other in siblings:
        if other == entry or not other.is_dir():
            continue
        try:
            if other.name.startswith(".tmp-"):
                stale = time.time() - other.stat().st_mtime > _STALE_TMP_S
            else:
                old = json.loads((other / MANIFEST).read_text(encoding="utf-8"))
                stale = old.get("gguf_sha256") == facts["gguf_sha256"]
        except (OSError, ValueError):
            continue
        if stale:
            shutil.rmtree(other, ignore_errors=True)


def _warn_once(where: Path, error: Exception) -> None:
    if str(where) in _warned:
        return
    _warned.add(str(where))
    warnings.warn(f"lensviz: cannot write the model cache in {where} ({type(error).__name__}: {error}); the GGUF "
                  f"file was converted without it (slow on every load). Set {ENV} to a writable folder, or pass "
                  "lv.load(cache=False).", CacheWarning, stacklevel=4)
