"""LoRA adapters on a frozen Hugging Face causal LM, and their verified artifact.

An adapter adds `scale * B @ A @ x` (A [r, in], B [out, r], scale = alpha / r) to the output of
chosen `nn.Linear` modules (default q/k/v/o projections of every layer). It is installed as a
forward hook on each Linear, prepended to its hooks, so the model's state_dict, its fingerprint
and a gate's pre-rotary capture hooks (which then see the adapted q/k, in training and at
inference alike) are unchanged; B starts at zero, so an attached adapter starts equal to the
base model. `LoRA.enabled = False` (or `adapters_disabled(model)`) turns it off: the same model
object is then the base model (the dense teacher of `gating.adapt`).

Artifact (a directory, written all or nothing by `adaptive_sparse.io.atomic_write_dir`):
  manifest.json      {format "adaptive-sparse-adapter", format_version 1, kind "lora",
                      model: the base model's fingerprint (`models.model_fingerprint`),
                      gates_sha256: sha256 of the gate weights it was trained under (or null),
                      rank, alpha, targets, modules {name: [in, out]}, meta, files {name:
                      {sha256, size}}, manifest_sha256 (of the canonical JSON of the rest)}
  adapter.safetensors  "<module name>.A" [r, in], "<module name>.B" [out, r] (float32)
`load_adapter` checks every hash, the base model's fingerprint, the module shapes and, when
asked, the gate weights; a mismatch raises ValueError naming the field (CLI exit 2). Never
pickle. The artifact sits in a gate folder's `adapter/` subfolder (`ADAPTER_DIR`), where
`export.load_sparsifier` picks it up, or anywhere else (pass it explicitly).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from adaptive_sparse.errors import fail

FORMAT = "adaptive-sparse-adapter"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "adapter.safetensors"
ADAPTER_DIR = "adapter"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_KEY = "_adaptive_sparse_lora"
_MAX_MANIFEST = 16 << 20
_MAX_TENSORS = 1 << 34


class LoRALinear(nn.Module):
    """The low-rank update of one Linear: delta(x) = scale * (x @ A^T) @ B^T, in x's dtype.
    A [rank, in] (Kaiming-uniform), B [out, rank] (zeros), float32 parameters."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        a = torch.rand(rank, in_features, generator=generator) * (2 * bound) - bound
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.A.to(x.device, x.dtype), self.B.to(x.device, x.dtype)
        return torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * self.scale


class LoRA(nn.Module):
    """The adapters of one model: `layers` {module name with "." -> "__": LoRALinear}, hooks
    on the model's Linears while attached. `enabled` switches every adapter on or off."""

    def __init__(self, model, rank: int, alpha: float, targets, *, seed: int = 0):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise fail("rank", "a positive int", rank)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
                or not math.isfinite(alpha) or alpha <= 0:
            raise fail("alpha", "a positive finite number", alpha)
        targets = tuple(targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise fail("targets", "a non-empty list of Linear module names (q_proj, ...)",
                       targets)
        self.rank, self.alpha, self.targets = rank, float(alpha), targets
        self.enabled = True
        gen = torch.Generator().manual_seed(seed)
        found = {name: m for name, m in model.named_modules()
                 if name.rsplit(".", 1)[-1] in targets and isinstance(m, nn.Linear)}
        missing = [t for t in targets if not any(n.rsplit(".", 1)[-1] == t for n in found)]
        if missing:
            raise fail("targets", "names of nn.Linear modules of the model", missing)
        self.names = sorted(found)
        self.layers = nn.ModuleDict({
            _key(n): LoRALinear(found[n].in_features, found[n].out_features, rank,
                                self.alpha / rank, gen) for n in self.names})
        param = next(model.parameters(), None)
        if param is not None:
            self.to(param.device)
        self._modules_of = found
        self._handles = []

    def shapes(self) -> dict[str, list[int]]:
        """{module name: [in, out]} of every adapted Linear."""
        return {n: [self.layers[_key(n)].A.shape[1], self.layers[_key(n)].B.shape[0]]
                for n in self.names}

    def attach(self, model) -> "LoRA":
        """Hook the adapters onto `model` (the one they were built for) and register them as
        its adapter (`get_lora`); `detach_lora(model)` undoes it."""
        current = get_lora(model)
        if current is not None and current is not self:
            raise fail("model", "a model without another attached adapter", type(model).__name__)
        model.__dict__[_KEY] = self.hook()
        return self

    def hook(self) -> "LoRA":
        self.unhook()
        for n in self.names:
            self._handles.append(self._modules_of[n].register_forward_hook(
                self._make_hook(self.layers[_key(n)]), prepend=True))
        return self

    def unhook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, lora: LoRALinear):
        def hook(module, args, output):
            if not self.enabled:
                return None
            return output + lora(args[0])
        return hook


def _key(name: str) -> str:
    return name.replace(".", "__")


def attach_lora(model, rank: int = 16, alpha: float = 32.0, targets=DEFAULT_TARGETS, *,
                seed: int = 0) -> LoRA:
    """Adapters (B = 0: the model's outputs are unchanged) on every Linear named in `targets`;
    the base model's parameters are frozen. Returns the `LoRA`; `detach_lora` removes it."""
    if get_lora(model) is not None:
        raise fail("model", "a model without an attached adapter (detach_lora first)",
                   type(model).__name__)
    lora = LoRA(model, rank, alpha, targets, seed=seed).attach(model)
    lora.frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    return lora


def get_lora(model) -> LoRA | None:
    return model.__dict__.get(_KEY)


def detach_lora(model) -> None:
    """Remove the attached adapter's hooks (the base model's requires_grad flags as they were
    before `attach_lora`)."""
    lora = model.__dict__.pop(_KEY, None)
    if lora is not None:
        lora.unhook()
        for p, flag in getattr(lora, "frozen", ()):
            p.requires_grad_(flag)


def enable(model, on: bool = True) -> None:
    """Switch the attached adapter on (or off with on=False)."""
    lora = get_lora(model)
    if lora is None:
        raise fail("model", "a model with an attached adapter (attach_lora)", None)
    lora.enabled = bool(on)


def disable(model) -> None:
    enable(model, False)


@contextlib.contextmanager
def adapters_disabled(model):
    """`with adapters_disabled(model):` runs the base model (no-op without an adapter)."""
    lora = get_lora(model)
    was = None if lora is None else lora.enabled
    if lora is not None:
        lora.enabled = False
    try:
        yield model
    finally:
        if lora is not None:
            lora.enabled = was


def gate_weights_sha256(gates) -> str:
    """sha256 of the gate weights file of a gate folder (anything `resolve_gates_dir` takes),
    as its verified manifest records it: what an adapter's `gates_sha256` names."""
    from adaptive_sparse.export.format import read_artifact
    from adaptive_sparse.export.gates import GATES_FILE
    from adaptive_sparse.gates import resolve_gates_dir

    raw = read_artifact(resolve_gates_dir(gates))
    entry = raw.manifest["files"].get(GATES_FILE)
    if entry is None:
        raise fail("gates", f"a gate folder with {GATES_FILE}", str(raw.path))
    return entry["sha256"]


def save_adapter(out, model, meta: Mapping | None = None, *, gates_sha256: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write the adapter attached to `model` as an artifact folder `out` (see the module
    docstring); meta: JSON-safe facts (training steps, tokens, loss ...). Returns `out`."""
    from safetensors.torch import save

    from adaptive_sparse.export.format import manifest_digest
    from adaptive_sparse.io import atomic_write_dir
    from adaptive_sparse.models.fingerprint import model_fingerprint, sha256_hex

    lora = get_lora(model)
    if lora is None:
        raise fail("model", "a model with an attached adapter (attach_lora)", None)
    tensors = {}
    for n in lora.names:
        layer = lora.layers[_key(n)]
        tensors[f"{n}.A"] = layer.A.detach().float().cpu().contiguous()
        tensors[f"{n}.B"] = layer.B.detach().float().cpu().contiguous()
    data = save(tensors)
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "lora",
            "model": model_fingerprint(model), "gates_sha256": gates_sha256,
            "rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets),
            "modules": lora.shapes(), "meta": json.loads(json.dumps(dict(meta or {}),
                                                                    default=str)),
            "files": {TENSORS: {"sha256": sha256_hex(data), "size": len(data)}}}
    body["manifest_sha256"] = manifest_digest(body)
    blobs = {TENSORS: data,
             MANIFEST: (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()}
    return atomic_write_dir(out, blobs, overwrite=overwrite, marker=MANIFEST)


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors) of an adapter folder, every hash verified (ValueError naming the
    field otherwise); nothing about the model is checked here."""
    import os

    from safetensors.torch import load

    from adaptive_sparse.export.format import manifest_digest
    from adaptive_sparse.io import open_in, read_dir_consistent
    from adaptive_sparse.models.fingerprint import sha256_hex

    if not isinstance(path, (str, os.PathLike)):
        raise fail("adapter", "an adapter folder path", type(path).__name__, cls=TypeError)
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise fail("adapter", f"an adapter folder holding {MANIFEST}", str(path))

    def reader(fd):
        try:
            m = json.loads(open_in(fd, MANIFEST, max_bytes=_MAX_MANIFEST))
        except (ValueError, UnicodeDecodeError) as e:
            raise fail("adapter", f"a JSON {MANIFEST}", f"{path}: {e}") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise fail("adapter.format", repr(FORMAT), None if not isinstance(m, dict)
                       else m.get("format"))
        if m.get("format_version") != FORMAT_VERSION:
            raise fail("adapter.format_version", f"{FORMAT_VERSION} (upgrade adaptive-sparse "
                       "for newer ones)", m.get("format_version"))
        body = {k: v for k, v in m.items() if k != "manifest_sha256"}
        if manifest_digest(body) != m.get("manifest_sha256"):
            raise fail("adapter.manifest_sha256", "the digest of the manifest (it was edited)",
                       m.get("manifest_sha256"))
        entry = (m.get("files") or {}).get(TENSORS)
        if not isinstance(entry, dict):
            raise fail("adapter.files", f"an entry for {TENSORS}", m.get("files"))
        try:
            data = open_in(fd, TENSORS, max_bytes=min(int(entry["size"]), _MAX_TENSORS))
        except FileNotFoundError:
            raise fail(f"adapter.files.{TENSORS}", "the file the manifest lists",
                       "missing") from None
        except (ValueError, PermissionError) as e:
            raise fail(f"adapter.files.{TENSORS}", "a plain file of the listed size",
                       str(e)) from None
        if sha256_hex(data) != entry["sha256"]:
            raise fail(f"adapter.files.{TENSORS}", "the sha256 in the manifest (the file is "
                       "corrupted or was modified)", sha256_hex(data))
        return m, load(data)

    return read_dir_consistent(path, reader)


def load_adapter(path, model, *, gates_sha256: str | None = None, check: str = "full") -> LoRA:
    """Verify the adapter at `path` against `model` and attach it (enabled). check "full": the
    base model's fingerprint with its weights; "architecture": its config and shapes only.
    gates_sha256: when given, the adapter must have been trained under those gate weights."""
    from adaptive_sparse.models.fingerprint import fingerprint_differences, model_fingerprint

    if check not in ("full", "architecture"):
        raise fail("check", "'full' or 'architecture'", check)
    m, tensors = read_adapter(path)
    actual = model_fingerprint(model)
    if check == "architecture":
        actual["weights_sha256"] = None
    diffs = fingerprint_differences(m.get("model") or {}, actual)
    if diffs:
        raise fail("model", f"the base model the adapter {path} was trained on",
                   "; ".join(diffs))
    if gates_sha256 is not None and m.get("gates_sha256") not in (None, gates_sha256):
        raise fail("gates", f"the gate weights the adapter {path} was trained under "
                   f"(sha256 {m.get('gates_sha256')})", f"sha256 {gates_sha256}")
    lora = attach_lora(model, int(m["rank"]), float(m["alpha"]), m["targets"])
    try:
        if lora.shapes() != m["modules"]:
            raise fail("adapter.modules", f"the model's Linear shapes {lora.shapes()}",
                       m["modules"])
        want = {f"{n}.{p}" for n in lora.names for p in "AB"}
        if set(tensors) != want:
            raise fail(f"adapter.files.{TENSORS}", f"tensors {sorted(want)[:4]}...",
                       sorted(tensors)[:4])
        with torch.no_grad():
            for n in lora.names:
                layer = lora.layers[_key(n)]
                for p in "AB":
                    t = tensors[f"{n}.{p}"]
                    dst = getattr(layer, p)
                    if tuple(t.shape) != tuple(dst.shape) or t.dtype != torch.float32:
                        raise fail(f"adapter.{n}.{p}", f"float32 {tuple(dst.shape)}",
                                   f"{t.dtype} {tuple(t.shape)}")
                    dst.copy_(t)
    except BaseException:
        detach_lora(model)
        raise
    lora.manifest = m
    return lora


def adapter_beside(gates) -> Path | None:
    """The adapter folder that sits in a gate folder (`<gates>/adapter`), or None."""
    p = Path(gates) / ADAPTER_DIR
    return p if (p / MANIFEST).is_file() else None
