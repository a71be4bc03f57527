"""Gates on a live model: pre-rotary Q/K capture, gate checkpoints, and the mask provider.

`QKCapture` installs forward hooks on every attention module's `q_proj` / `k_proj` (or
`q_norm` / `k_norm` where the model normalizes heads) and keeps the latest pre-rotary
`q [B, Hq, N, D]` and `k [B, Hkv, N, D]` per layer; nothing of the modeling code is copied.
`GateProvider` is a provider for `adaptive_sparse.models.sparse_attention`: called with
`(layer_idx, q, k)` (post-rotary) it scores the captured pre-rotary tensors with the layer's gate
and turns the scores into a `BlockSparseMask` through `Policy.to_mask`.

Gate checkpoints are a directory: `gates.safetensors` (weights) and `gates.json` (format,
version, GateConfig, sha256 of the weights, optional metadata). Never a pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from gating.gates import GateConfig, GateSet, model_shapes

GATES_FORMAT = "adaptive-sparse-gates"
GATES_VERSION = 1
WEIGHTS_FILE = "gates.safetensors"
CONFIG_FILE = "gates.json"


def _fail(name: str, expected: str, got) -> ValueError:
    return ValueError(f"{name}: expected {expected}, got {got!r}")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_tensors(path, tensors: dict, metadata: dict | None = None) -> str:
    """safetensors file written atomically; returns its sha256."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def attention_modules(model) -> list:
    """The model's attention modules (those with q_proj and k_proj), ordered by layer index."""
    mods = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")]
    if not mods:
        raise _fail("model", "attention modules with q_proj and k_proj", type(model).__name__)
    if all(isinstance(getattr(m, "layer_idx", None), int) for m in mods):
        mods.sort(key=lambda m: m.layer_idx)
    return mods


class QKCapture:
    """Forward hooks that keep each layer's latest pre-rotary q [B, Hq, N, D], k [B, Hkv, N, D].

    Use as a context manager or call `remove()`. `on_capture(layer_idx, which, tensor)`, if
    given, is called for every captured tensor ("q" or "k") and may store a reduced form; the
    raw tensor is then not kept."""

    def __init__(self, model, on_capture=None):
        self.head_dim = model_shapes(model)["head_dim"]
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.on_capture = on_capture
        self._handles = []
        for idx, attn in enumerate(attention_modules(model)):
            for which in ("q", "k"):
                src = getattr(attn, f"{which}_norm", None)
                if not isinstance(src, torch.nn.Module):
                    src = getattr(attn, f"{which}_proj")
                self._handles.append(src.register_forward_hook(self._hook(idx, which)))

    def _hook(self, layer_idx: int, which: str):
        def hook(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            B, N = x.shape[0], x.shape[1]
            x = x.detach().reshape(B, N, -1, self.head_dim).transpose(1, 2)  # [B, H, N, D]
            if self.on_capture is not None:
                self.on_capture(layer_idx, which, x)
            else:
                getattr(self, which)[layer_idx] = x
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def save_gates(gate_set: GateSet, directory, *, metadata: dict | None = None) -> Path:
    """Write `gates.safetensors` + `gates.json` into `directory` (atomically); returns it."""
    if not isinstance(gate_set, GateSet):
        raise _fail("gate_set", "a GateSet", type(gate_set).__name__)
    directory = Path(directory)
    digest = atomic_save_tensors(directory / WEIGHTS_FILE, gate_set.state_dict())
    atomic_write_json(directory / CONFIG_FILE, {
        "format": GATES_FORMAT, "version": GATES_VERSION, "config": gate_set.config.to_dict(),
        "weights_sha256": digest, "metadata": metadata or {}})
    return directory


def read_gates_info(directory) -> dict:
    """The parsed gates.json of a gate directory (format and version checked)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise _fail("directory", f"a gate directory holding {CONFIG_FILE}", str(directory))
    info = json.loads(path.read_text())
    if info.get("format") != GATES_FORMAT:
        raise _fail("format", repr(GATES_FORMAT), info.get("format"))
    if info.get("version") != GATES_VERSION:
        raise _fail("version", str(GATES_VERSION), info.get("version"))
    return info


def load_gates(directory, model=None, *, map_location="cpu") -> GateSet:
    """Load a gate set saved by `save_gates`. With `model`, refuse gates built for other shapes
    (the message names the differing field)."""
    directory = Path(directory)
    info = read_gates_info(directory)
    weights = directory / WEIGHTS_FILE
    digest = sha256_file(weights)
    if digest != info["weights_sha256"]:
        raise _fail(str(weights), f"sha256 {info['weights_sha256']}", digest)
    config = GateConfig.from_dict(info["config"])
    if model is not None:
        shapes = model_shapes(model)
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if shapes[name] != getattr(config, name):
                raise _fail(name, f"{getattr(config, name)} (the gates' model)",
                            f"{shapes[name]} in the given model")
    from safetensors.torch import load_file

    gate_set = GateSet(config)
    gate_set.load_state_dict(load_file(str(weights), device=str(map_location)))
    return gate_set.to(map_location)


def _remember_blocks_per_row(mask, value: float) -> None:
    """Hand the triton backend its autotune statistic (no-op without triton)."""
    try:
        from adaptive_sparse.attention.triton import remember_blocks_per_row
    except ImportError:  # triton not installed: its backend is unavailable anyway
        return
    remember_blocks_per_row(mask, value)


def _as_policy(policy):
    from adaptive_sparse.policies import Policy

    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, dict):
        return Policy.from_dict(policy)
    raise _fail("policy", "an adaptive_sparse.policies.Policy or its dict", type(policy).__name__)


class GateProvider:
    """Mask provider backed by a gate set: `provider(layer_idx, q, k) -> BlockSparseMask`.

    gate_set: GateSet (or a directory saved by `save_gates`); policy: Policy or its dict;
    model: the base model, on which the pre-rotary capture hooks are installed (`attach`).
    q [B, Hq, N, D] and k [B, Hkv, M, D] are the post-rotary tensors the attention sees; only
    their lengths are used. With a KV cache (M > N), the pre-rotary keys of earlier calls are
    kept per layer, so decoding steps are scored against the whole cache."""

    def __init__(self, gate_set, policy, model=None):
        if isinstance(gate_set, (str, os.PathLike)):
            gate_set = load_gates(gate_set, model)
        if not isinstance(gate_set, GateSet):
            raise _fail("gate_set", "a GateSet or a gate directory", type(gate_set).__name__)
        self.gate_set = gate_set.eval()
        self.policy = _as_policy(policy)
        self.capture = None
        self._k_hist: dict[int, torch.Tensor] = {}
        self.last_scores: dict[int, torch.Tensor] = {}
        self.keep_scores = False
        self._bpr: dict[tuple, float | None] = {}
        if model is not None:
            self.attach(model)

    def attach(self, model) -> "GateProvider":
        self.detach()
        shapes = model_shapes(model)
        c = self.gate_set.config
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if shapes[name] != getattr(c, name):
                raise _fail(name, f"{getattr(c, name)} (the gates' model)",
                            f"{shapes[name]} in the given model")
        self.capture = QKCapture(model)
        return self

    def detach(self) -> None:
        if self.capture is not None:
            self.capture.remove()
            self.capture = None
        self._k_hist.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()

    def _keys(self, layer_idx: int, kv_len: int) -> torch.Tensor:
        new = self.capture.k[layer_idx]
        prev = self._k_hist.get(layer_idx)
        if new.shape[2] == kv_len:
            full = new
        elif prev is not None and prev.shape[2] + new.shape[2] == kv_len:
            full = torch.cat([prev, new], dim=2)
        else:
            raise _fail("k", f"kv_len {kv_len} matching the captured keys "
                        f"({0 if prev is None else prev.shape[2]} cached + {new.shape[2]} new)",
                        kv_len)
        self._k_hist[layer_idx] = full
        return full

    @torch.no_grad()
    def scores(self, layer_idx: int, q_len: int, kv_len: int) -> torch.Tensor:
        """Gate scores float32 [B, H, Qb, Kb] for the captured tensors of `layer_idx`."""
        if self.capture is None:
            raise _fail("model", "attach(model) before calling the provider", None)
        if layer_idx not in self.capture.q:
            raise _fail("layer_idx", "a layer whose q/k were captured in this forward", layer_idx)
        q_pre = self.capture.q[layer_idx]
        if q_pre.shape[2] != q_len:
            raise _fail("q", f"q_len {q_pre.shape[2]} (captured pre-rotary queries)", q_len)
        k_pre = self._keys(layer_idx, kv_len)
        gate = self.gate_set[layer_idx]
        param = gate.wq
        return gate(q_pre.to(param.device), k_pre.to(param.device))

    def _blocks_per_row(self, layer_idx: int, q_len: int, kv_len: int, heads: int):
        """The policy's host-side mean blocks per row (None when it depends on the scores),
        cached per (policy, layer, lengths, heads)."""
        c = self.gate_set.config
        key = (repr(self.policy), layer_idx, q_len, kv_len, heads)
        if key not in self._bpr:
            if len(self._bpr) > 4096:
                self._bpr.clear()
            self._bpr[key] = self.policy.expected_blocks_per_row(
                q_len=q_len, kv_len=kv_len, block_size=c.block_size, layer_idx=layer_idx,
                num_layers=c.num_layers, heads=heads)
        return self._bpr[key]

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor):
        """The layer's mask, built without any host-device sync: the policy's value checks
        are skipped (the scores come from the gate, the mask is valid by construction), and
        for top-k / density policies on CUDA the mean blocks per row is handed to the triton
        backend from the host (`remember_blocks_per_row`) instead of being read back."""
        scores = self.scores(layer_idx, q.shape[2], k.shape[2]).to(q.device)
        if self.keep_scores:
            self.last_scores[layer_idx] = scores
        c = self.gate_set.config
        mask = self.policy.to_mask(scores, q_len=q.shape[2], kv_len=k.shape[2],
                                   block_size=c.block_size, layer_idx=layer_idx,
                                   num_layers=c.num_layers, validate=False)
        if scores.is_cuda:
            bpr = self._blocks_per_row(layer_idx, q.shape[2], k.shape[2], scores.shape[1])
            if bpr is not None:
                _remember_blocks_per_row(mask, bpr)
        return mask
