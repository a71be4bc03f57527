"""`load_sparsifier(model, path)`: attach an artifact to a Hugging Face model.

After the call the model runs sparse attention on every forward with no other code:
  gate   -> adaptive_sparse.gates.GateProvider(gate_set, policy, model) decides each layer's mask
  static -> the mask of the smallest length bucket >= the sequence, cropped (prefill only;
            decoding steps with q_len != kv_len and longer sequences run dense)
  masks  -> the stored mask when the sequence has exactly its length, else dense
The returned `Sparsifier` detaches it again (`handle.detach()`, or use it as a context manager).
A gate's LoRA adapter (`adaptive_sparse.adapters`, trained under its masks) in the gate folder's
`adapter/` subfolder, or given with `adapter=`, is verified and attached with it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from adaptive_sparse.models.fingerprint import fingerprint_differences, model_fingerprint
from adaptive_sparse.export.format import ArtifactError, read_artifact
from adaptive_sparse.export.masks import MaskArtifact, masks_from_raw


CHECKS = ("full", "architecture")


def check_fingerprint(stored: dict | None, model, *, check: str = "full") -> None:
    """Refuse (ArtifactError) when `model` differs from the artifact's base model, naming every
    differing field. check="full" compares the architecture, the config and the weights;
    check="architecture" accepts other weights of the same architecture and config (a
    fine-tuned model, or the same model quantized differently)."""
    if check not in CHECKS:
        raise ValueError(f"check: expected one of {CHECKS}, got {check!r}")
    if stored is None:
        return
    actual = model_fingerprint(model)
    if check == "architecture":
        actual["weights_sha256"] = None
    diffs = fingerprint_differences(stored, actual)
    if diffs:
        raise ArtifactError("model: the artifact was made for a different base model: "
                            + "; ".join(diffs))


class ArtifactMaskProvider:
    """Provider protocol over a mask or static artifact: (layer_idx, q [B,Hq,N,D],
    k [B,Hkv,M,D]) -> BlockSparseMask | None. Masks are cached per (layer, length, device)."""

    def __init__(self, artifact: MaskArtifact):
        self.artifact = artifact
        self._cache: dict = {}

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor):
        n, m = q.shape[2], k.shape[2]
        if n != m:
            return None
        key = (layer_idx, n, str(q.device))
        if key not in self._cache:
            mask = self.artifact.mask_for(layer_idx, n)
            if mask is not None and mask.batch not in (1, q.shape[0]):
                mask = None
            self._cache[key] = None if mask is None else mask.to(q.device)
        return self._cache[key]


class Sparsifier:
    """Handle returned by `load_sparsifier`: `.artifact`, `.provider`, `.detach()` (removes
    the gate's capture hooks too), `.attach()` again, or `with load_sparsifier(...):`."""

    def __init__(self, model, artifact, provider, block_size: int, adapter=None):
        self.model, self.artifact, self.provider = model, artifact, provider
        self.block_size = block_size
        self.adapter = adapter  # adaptive_sparse.adapters.LoRA loaded with the gate, or None
        self.attached = False

    def attach(self, backend: str = "auto") -> "Sparsifier":
        from adaptive_sparse.models import enable_sparse_attention

        if self.attached:
            raise RuntimeError("Sparsifier: already attached")
        if self.adapter is not None:
            self.adapter.attach(self.model)
        if getattr(self.provider, "capture", False) is None:
            self.provider.attach(self.model)
        enable_sparse_attention(self.model, self.provider, block_size=self.block_size,
                                backend=backend)
        self.attached = True
        return self

    def detach(self) -> None:
        """Restore the model's previous attention."""
        from adaptive_sparse.models import disable_sparse_attention

        if not self.attached:
            raise RuntimeError("Sparsifier: not attached")
        disable_sparse_attention(self.model)
        if callable(getattr(self.provider, "detach", None)):
            self.provider.detach()
        if self.adapter is not None:
            from adaptive_sparse.adapters import detach_lora

            detach_lora(self.model)
        self.attached = False

    def __enter__(self) -> "Sparsifier":
        return self

    def __exit__(self, *exc) -> None:
        if self.attached:
            self.detach()


def load_sparsifier(model, path, *, backend: str = "auto", check: str = "full",
                    policy=None, adapter="auto") -> Sparsifier:
    """Verify the artifact at `path` (format, every hash, fingerprint against `model`) and
    attach it. Raises ArtifactError on any mismatch, naming the field.

    check: "full" (default) requires the model the artifact was made for: same architecture,
    config and weights (`adaptive_sparse.models.model_fingerprint`, whatever file the weights
    were loaded from); "architecture" relaxes it to the same architecture and config with any
    weights, for a fine-tuned or re-quantized model (the masks may then fit less well).

    Gates: `path` may be any gate folder `adaptive_sparse.gates.resolve_gates_dir` accepts (a
    training run, version or gates folder: the same format, see export/gates.py). policy: a
    Policy or its dict, used instead of the stored one; required for a training folder, which
    stores none. A gate folder without a fingerprint is checked against the model's attention
    shapes only.

    adapter (gates only): "auto" loads the gate folder's `adapter/` when there is one, a path
    loads that adapter folder, None none; it is verified (hashes, base model, shapes, the gate
    weights it was trained under; ValueError otherwise) and on while attached."""
    if check not in CHECKS:
        raise ValueError(f"check: expected one of {CHECKS}, got {check!r}")
    raw = read_artifact(_artifact_dir(path))
    check_fingerprint(raw.fingerprint, model, check=check)
    if raw.kind == "gate":
        from adaptive_sparse.export.gates import gate_from_raw
        from adaptive_sparse.gates import GateProvider
        from adaptive_sparse.gates.network import check_model_shapes
        from adaptive_sparse.policies import Policy

        art = gate_from_raw(raw)
        if raw.fingerprint is None:
            try:
                check_model_shapes(art.gate_set.config, model)
            except ValueError as e:
                raise ArtifactError(f"model: the gates were trained for other attention "
                                    f"shapes: {e}") from None
        chosen = art.policy if policy is None else Policy.coerce(policy)
        if chosen is None:
            raise ValueError(f"policy: the gate folder {raw.path} stores no policy (training "
                             "writes none); pass policy= (a Policy or its dict), or export it "
                             "with `adaptive-sparse export gate --policy-file`")
        param = next(model.parameters(), None)
        if param is not None:
            art.gate_set.to(param.device)
        lora = _load_adapter(adapter, raw, model, check)
        provider = GateProvider(art.gate_set, chosen, model)
        return Sparsifier(model, art, provider, raw.block_size, lora).attach(backend)
    else:
        if adapter not in (None, "auto"):
            raise ValueError(f"adapter: only a gate artifact takes an adapter, {raw.path} is a "
                             f"{raw.kind} artifact")
        if policy is not None:
            raise ValueError(f"policy: only a gate artifact takes a policy, {raw.path} is a "
                             f"{raw.kind} artifact")
        art = masks_from_raw(raw)
        n_layers = _num_layers(model)
        bad = [layer for layer in art.layers if layer >= n_layers]
        if bad:
            raise ArtifactError(f"content.entries: layer {bad[0]} >= the model's "
                                f"{n_layers} layers")
        provider = ArtifactMaskProvider(art)
    return Sparsifier(model, art, provider, raw.block_size).attach(backend)


def _load_adapter(adapter, raw, model, check: str):
    """The LoRA of `adapter` ("auto": the gate folder's own, if any), verified against the
    model and the gate weights of `raw`; None without one."""
    from adaptive_sparse.adapters import adapter_beside, detach_lora, load_adapter

    where = adapter_beside(raw.path) if adapter == "auto" else adapter
    if where is None:
        return None
    sha = raw.manifest["files"].get("gates.safetensors", {}).get("sha256")
    lora = load_adapter(where, model, gates_sha256=sha, check=check)
    detach_lora(model)  # attached again by Sparsifier.attach
    return lora


def _artifact_dir(path) -> Path:
    """`path`, or the gate folder of a training run / version folder that holds no manifest;
    an old two-file gate folder is refused with the command that converts it."""
    from adaptive_sparse.gates.checkpoint import MANIFEST, is_legacy, resolve_gates_dir

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected an artifact directory path, got {type(path).__name__}")
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    try:
        found = resolve_gates_dir(path)
    except ValueError:
        return path  # read_artifact names what is missing
    if is_legacy(found):
        raise ArtifactError(f"{found}: an old two-file gate folder (gates.json); load it with "
                            "adaptive_sparse.gates.load_gates, or convert it with `adaptive-sparse "
                            f"export gate --gates {found} --policy-file P.json --out DIR`")
    return found


def _num_layers(model) -> int:
    from adaptive_sparse.models.config import text_config

    return int(text_config(model).num_hidden_layers)
