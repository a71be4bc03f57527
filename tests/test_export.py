"""Artifacts: round trips, converters, corruption and edit detection, fingerprints, atomicity."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from adaptive_sparse.attention.api import block_sparse_attention
from adaptive_sparse.attention.block_maps import attention_recall, block_attention_maps
from adaptive_sparse.export import (
    ArtifactError, FORMAT_VERSION, aggregate_static, convert_artifact, crop, load_masks, save_masks,
    save_static, static_recall, to_bsr, to_dense, to_flex)
from adaptive_sparse.models.fingerprint import canonical_json, sha256_hex
from adaptive_sparse.export.format import manifest_digest
from adaptive_sparse.masks import BlockSparseMask, block_causal, diagonal_blocks

REPO = Path(__file__).resolve().parents[1]


def random_mask(gen, batch, heads, n, bs=16, p=0.4, m=None) -> BlockSparseMask:
    m = n if m is None else m
    qb, kb = -(-n // bs), -(-m // bs)
    dense = (torch.rand(batch, heads, qb, kb, generator=gen) < p) & block_causal(n, m, bs)
    dense |= diagonal_blocks(n, m, bs)
    return BlockSparseMask.from_dense(dense, block_size=bs, q_len=n, kv_len=m)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def tiny_llama(seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
               max_position_embeddings=512)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def rewrite_manifest(path: Path, edit, *, rehash: bool) -> None:
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    if rehash:
        body = {k: v for k, v in m.items() if k != "manifest_sha256"}
        m["manifest_sha256"] = manifest_digest(body)
    (path / "manifest.json").write_text(json.dumps(m))


def test_mask_artifact_round_trip_is_bit_identical(tmp_path, gen):
    masks = {0: random_mask(gen, 2, 4, 100), 1: random_mask(gen, 2, 2, 100, m=160),
             3: random_mask(gen, 1, 4, 100)}
    path = save_masks(tmp_path / "art", masks, method="random", params={"p": 0.4},
                      inputs={"seq_len": 100})
    art = load_masks(path)
    assert art.kind == "masks" and art.layers == [0, 1, 3]
    for layer, m in masks.items():
        got = art.layer_masks()[layer]
        assert got.kv_num_blocks.dtype == torch.int32 and got.kv_indices.dtype == torch.int32
        assert torch.equal(got.kv_num_blocks, m.kv_num_blocks)
        assert torch.equal(got.kv_indices, m.kv_indices)
        assert (got.q_len, got.kv_len, got.causal) == (m.q_len, m.kv_len, m.causal)
    stats = art.manifest["stats"]
    sel = sum(int(m.kv_num_blocks.sum()) for m in masks.values())
    tot = sum(int(m.allowed().sum()) * m.batch * m.heads for m in masks.values())
    assert stats["density"] == pytest.approx(sel / tot)
    per_head = {e["layer"]: e["per_head"] for e in stats["layers"]}
    assert per_head[1] == pytest.approx(masks[1].density_per_head().tolist())
    assert art.manifest["method"] == {"name": "random", "params": {"p": 0.4}}
    assert art.manifest["format_version"] == FORMAT_VERSION
    assert sorted(os.listdir(tmp_path)) == ["art"]


def test_aggregate_static_matches_a_loop(gen):
    n, bs, heads = 160, 16, 3
    docs = [random_mask(gen, 2, heads, n, p=0.5) for _ in range(3)]
    frac, budget = 0.5, 4
    got = aggregate_static(docs, min_fraction=frac, max_blocks_per_row=budget).to_dense()[0]
    dense = torch.cat([d.to_dense() for d in docs])  # [6, H, Qb, Kb]
    allowed, diag = block_causal(n, n, bs), diagonal_blocks(n, n, bs)
    qb = allowed.shape[0]
    for h in range(heads):
        for r in range(qb):
            forced = {c for c in range(qb) if diag[r, c] or c == 0}
            freq = {c: float(dense[:, h, r, c].double().mean()) for c in range(qb)
                    if allowed[r, c]}
            cand = [c for c, f in freq.items() if (f >= frac and f > 0) or c in forced]
            cand.sort(key=lambda c: (c not in forced, -freq[c], abs(r - c)))
            want = set(cand[:budget])
            assert {c for c in range(qb) if got[h, r, c]} == want, (h, r)
    unlimited = aggregate_static(docs, min_fraction=0.0, max_blocks_per_row=None)
    sink = torch.zeros_like(allowed)
    sink[:, 0] = True
    assert torch.equal(unlimited.to_dense()[0], (dense.any(0) | diag | sink) & allowed)


def test_static_artifact_round_trip_and_recall(tmp_path, gen):
    n, bs, heads = 128, 16, 4
    static = {layer: aggregate_static([random_mask(gen, 2, heads, n) for _ in range(2)],
                                      min_fraction=0.5, max_blocks_per_row=3)
              for layer in range(2)}
    q = torch.randn(2, heads, n, 8, generator=gen)
    k = torch.randn(2, 2, n, 8, generator=gen)
    _, block_sum = block_attention_maps(q, k, block_size=bs)
    rec = [float(static_recall(static[layer], block_sum).mean()) for layer in range(2)]
    assert rec[0] == pytest.approx(float(attention_recall(block_sum, static[0].to_dense()).mean()))
    recall = {n: {"mean": sum(rec) / 2, "per_layer": rec, "docs": 2}}
    path = save_static(tmp_path / "s", {n: static}, min_fraction=0.5, max_blocks_per_row=3,
                       calibration_docs=4, recall=recall)
    art = load_masks(path)
    assert art.kind == "static" and art.buckets == [n]
    for layer, m in static.items():
        assert torch.equal(art.layer_masks(n)[layer].kv_indices, m.kv_indices)
        assert torch.equal(art.layer_masks(n)[layer].kv_num_blocks, m.kv_num_blocks)
    assert art.manifest["content"]["static"]["recall"][str(n)]["per_layer"] == rec
    cropped = art.mask_for(0, 70)
    assert (cropped.q_len, cropped.kv_len) == (70, 70)
    assert torch.equal(cropped.to_dense(), static[0].to_dense()[:, :, :5, :5])
    assert art.mask_for(0, n + 1) is None


def fp64_masked_attention(q, k, v, mask: BlockSparseMask):
    """Oracle: dense fp64 attention with the block mask expanded to elements."""
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    bs = mask.block_size
    dense = mask.expand_heads(Hq if mask.heads != 1 else 1).to_dense()
    elem = dense.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[..., :N, :M]
    elem = elem & (torch.arange(M)[None, :] <= torch.arange(N)[:, None] + (M - N))
    kk = k.double().repeat_interleave(Hq // Hkv, 1)
    vv = v.double().repeat_interleave(Hq // Hkv, 1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(D)
    s = s.masked_fill(~elem, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ vv


def test_flex_conversion_matches_reference_and_fp64(tmp_path, gen):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    from safetensors.torch import load_file

    n, heads, kv_heads, d = 200, 4, 2, 16
    mask = random_mask(gen, 1, heads, n)
    path = save_masks(tmp_path / "m", {0: mask})
    q = torch.randn(1, heads, n, d, generator=gen)
    k = torch.randn(1, kv_heads, n, d, generator=gen)
    v = torch.randn(1, kv_heads, n, d, generator=gen)
    loaded = load_masks(path).layer_masks()[0]
    ref = block_sparse_attention(q, k, v, loaded, backend="reference")
    via_backend = block_sparse_attention(q, k, v, loaded, backend="flex")
    via_convert = flex_attention(q, k, v, block_mask=to_flex(path, 0), enable_gqa=True)
    oracle = fp64_masked_attention(q, k, v, mask)
    err_ref = (ref.double() - oracle).abs().max()
    for out in (via_backend, via_convert):
        assert torch.isfinite(out).all()
        assert (out.double() - oracle).abs().max() <= max(4 * err_ref, 1e-5)
    torch.testing.assert_close(via_convert, ref, atol=2e-5, rtol=1e-4)
    # the on-disk flex layout rebuilds the same BlockMask
    out_dir = convert_artifact(path, "flex", tmp_path / "flex")
    layout = json.loads((out_dir / "layout.json").read_text())
    t = load_file(out_dir / "flex.safetensors")
    def causal(b, h, qi, ki):
        return ki <= qi

    rebuilt = BlockMask.from_kv_blocks(t["layers.0.kv_num_blocks"], t["layers.0.kv_indices"],
                                       t["layers.0.full_kv_num_blocks"],
                                       t["layers.0.full_kv_indices"],
                                       BLOCK_SIZE=layout["block_size"], mask_mod=causal,
                                       seq_lengths=(n, n))
    assert torch.equal(BlockSparseMask.from_flex(rebuilt).to_dense(), mask.to_dense())
    assert int(t["layers.0.full_kv_num_blocks"].sum()) > 0  # kept tiles off the diagonal


def test_bsr_and_dense_conversions_match_to_dense(tmp_path, gen):
    from safetensors.torch import load_file

    masks = {0: random_mask(gen, 2, 3, 90), 1: random_mask(gen, 1, 2, 64, m=150)}
    path = save_masks(tmp_path / "m", masks)
    for layer, m in masks.items():
        want = m.to_dense()
        assert torch.equal(to_dense(path, layer), want)
        mats = to_bsr(path, layer)
        bs = m.block_size
        for b in range(m.batch):
            for h in range(m.heads):
                blocks = torch.as_tensor(mats[b][h].toarray()[::bs, ::bs])
                assert torch.equal(blocks, want[b, h]), (layer, b, h)
    dense_dir = convert_artifact(path, "dense", tmp_path / "dense")
    bsr_dir = convert_artifact(path, "bsr", tmp_path / "bsr")
    dense_t = load_file(dense_dir / "dense.safetensors")
    bsr_t = load_file(bsr_dir / "bsr.safetensors")
    for layer, m in masks.items():
        want = m.to_dense()
        assert torch.equal(dense_t[f"layers.{layer}.mask"], want)
        indptr, indices = bsr_t[f"layers.{layer}.indptr"], bsr_t[f"layers.{layer}.indices"]
        rebuilt = torch.zeros_like(want)
        for b in range(m.batch):
            for h in range(m.heads):
                for r in range(want.shape[2]):
                    cols = indices[b, h, indptr[b, h, r]:indptr[b, h, r + 1]].long()
                    rebuilt[b, h, r, cols] = True
                assert bool((indices[b, h, indptr[b, h, -1]:] == -1).all())
        assert torch.equal(rebuilt, want)
    with pytest.raises(ValueError, match="to: expected one of"):
        convert_artifact(path, "csr", tmp_path / "x")


@pytest.fixture
def small_artifact(tmp_path, gen):
    return save_masks(tmp_path / "small", {0: random_mask(gen, 1, 2, 48),
                                           1: random_mask(gen, 1, 2, 48)},
                      method="random", params={"p": 0.4, "note": "x"}, inputs={"seq_len": 48})


def test_every_flipped_byte_of_the_tensor_file_is_caught(small_artifact):
    f = small_artifact / "masks.safetensors"
    data = f.read_bytes()
    assert len(data) < 4096
    for i in range(len(data)):
        for flip in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= flip
            f.write_bytes(bytes(bad))
            with pytest.raises(ArtifactError, match="masks.safetensors"):
                load_masks(small_artifact)
    f.write_bytes(data)
    load_masks(small_artifact)
    f.write_bytes(data[:-1])
    with pytest.raises(ArtifactError, match="size"):
        load_masks(small_artifact)
    f.write_bytes(data + b"\0")
    with pytest.raises(ArtifactError, match="size"):
        load_masks(small_artifact)
    f.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_masks(small_artifact)


def test_every_flipped_byte_of_the_manifest_is_caught(small_artifact):
    f = small_artifact / "manifest.json"
    data = f.read_bytes()
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        f.write_bytes(bytes(bad))
        with pytest.raises(ArtifactError):
            load_masks(small_artifact)


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
        yield path, obj
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
        yield path, obj
    else:
        yield path, obj


def _edited(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 + 0.01
    if isinstance(value, str):
        return value + "x"
    if value is None:
        return 0
    if isinstance(value, list):
        return value[:-1] if value else [0]
    return {**value, "extra": 1} if value else {"extra": 1}


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def test_every_edited_manifest_field_is_caught(small_artifact):
    base = json.loads((small_artifact / "manifest.json").read_text())
    paths = [p for p, _ in _leaves(base) if p]
    assert len(paths) > 40
    for path in paths:
        def edit(m, path=path):
            cur = m
            for p in path:
                cur = cur[p]
            _set(m, path, _edited(cur))
        (small_artifact / "manifest.json").write_text(json.dumps(base))
        rewrite_manifest(small_artifact, edit, rehash=False)
        with pytest.raises(ArtifactError, match="manifest"):
            load_masks(small_artifact)
    for key in base:
        m = dict(base)
        del m[key]
        (small_artifact / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ArtifactError, match="manifest"):
            load_masks(small_artifact)


@pytest.mark.parametrize("path,value,needle", [
    (("content", "entries", 0, "q_len"), 64, "masks.safetensors: layers.0: expected shapes"),
    (("content", "entries", 0, "key"), "layers.9", "content.entries\\[0\\].key"),
    (("content", "entries", 0, "causal"), "yes", "content.entries\\[0\\].causal"),
    (("stats", "density"), 0.123, "stats.density"),
    (("stats", "density"), 1.5, "stats.density"),
    (("block_size",), 24, "block_size"),
    (("kind",), "weights", "kind"),
    (("files", "masks.safetensors", "size"), 7, "files.masks.safetensors.size"),
    (("files", "masks.safetensors", "sha256"), "ab" * 32, "sha256 does not match"),
    (("method", "params"), [], "method.params"),
])
def test_consistent_but_wrong_manifest_is_refused_by_field(small_artifact, path, value, needle):
    rewrite_manifest(small_artifact, lambda m: _set(m, path, value), rehash=True)
    with pytest.raises(ArtifactError, match=needle):
        load_masks(small_artifact)


def test_future_format_version_is_refused_clearly(small_artifact):
    rewrite_manifest(small_artifact, lambda m: m.update(format_version=FORMAT_VERSION + 1),
                     rehash=True)
    with pytest.raises(ArtifactError, match=f"format version {FORMAT_VERSION + 1}.*upgrade"):
        load_masks(small_artifact)
    rewrite_manifest(small_artifact, lambda m: m.update(format="other-format"), rehash=True)
    with pytest.raises(ArtifactError, match="manifest.format: expected"):
        load_masks(small_artifact)


def test_no_pickle_and_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_masks(tmp_path)
    src = (REPO / "adaptive_sparse" / "export" / "format.py").read_text()
    src += (REPO / "adaptive_sparse" / "export" / "masks.py").read_text()
    assert "pickle" not in src.replace("unpickled", "") and "torch.load" not in src


def test_fingerprint_mismatch_is_refused_naming_the_field(tmp_path, gen):
    from adaptive_sparse.export.attach import check_fingerprint
    from adaptive_sparse.models.fingerprint import model_fingerprint

    model = tiny_llama()
    path = save_masks(tmp_path / "m", {0: random_mask(gen, 1, 4, 64)}, model=model)
    stored = load_masks(path).fingerprint
    assert stored == json.loads(canonical_json(model_fingerprint(model)))
    assert stored["config_sha256"] == sha256_hex(canonical_json(stored["config"]).encode())
    check_fingerprint(stored, model)
    check_fingerprint(stored, tiny_llama(seed=0))
    cases = [(tiny_llama(num_key_value_heads=4), "num_kv_heads: artifact 2, model 4"),
             (tiny_llama(num_hidden_layers=3), "num_layers: artifact 2, model 3"),
             (tiny_llama(rms_norm_eps=1e-5), "config.rms_norm_eps"),
             (tiny_llama(rope_theta=500000.0), "rotary"),
             (tiny_llama(seed=1), "weights_sha256")]
    for other, needle in cases:
        with pytest.raises(ArtifactError, match="different base model") as info:
            check_fingerprint(stored, other)
        assert needle in str(info.value)
    check_fingerprint(stored, tiny_llama(seed=1), check="architecture")
    fp32 = tiny_llama(seed=2)
    bf16 = tiny_llama(seed=2).to(torch.bfloat16)
    check_fingerprint(json.loads(canonical_json(model_fingerprint(fp32))), bf16)


def _check_attached_logits(model, path, ids, live, *, as_context: bool):
    """The artifact at `path`, attached to `model` (as a context, or attached then detached),
    gives the logits of the live provider it was made from (`live()`: a context), not the dense
    ones, and dense ones again once detached."""
    from adaptive_sparse.export import load_sparsifier

    with torch.no_grad():
        dense = model(ids).logits
        with live():
            want = model(ids).logits
        if as_context:
            with load_sparsifier(model, path) as handle:
                got = model(ids).logits
                assert handle.attached
        else:
            handle = load_sparsifier(model, path)
            got = model(ids).logits
            handle.detach()
        assert not handle.attached
        after = model(ids).logits
    assert torch.equal(got, want)
    assert not torch.allclose(got, dense, atol=1e-4)
    torch.testing.assert_close(after, dense)


def test_static_artifact_attaches_and_detaches(tmp_path, gen):
    from adaptive_sparse.export import load_sparsifier
    from adaptive_sparse.models import sparse_attention

    model = tiny_llama()
    n, bs = 64, 16
    static = {layer: aggregate_static([random_mask(gen, 1, 4, n, p=0.3)], min_fraction=0.5)
              for layer in range(2)}
    path = save_static(tmp_path / "s", {n: static}, model=model, min_fraction=0.5,
                       max_blocks_per_row=None, calibration_docs=1)
    ids = torch.randint(0, 97, (1, 50), generator=gen)
    _check_attached_logits(model, path, ids, lambda: sparse_attention(
        model, lambda i, q, k: crop(static[i], q.shape[2]), block_size=bs), as_context=False)
    with pytest.raises(ArtifactError, match="num_kv_heads"):
        load_sparsifier(tiny_llama(num_key_value_heads=4), path)


def test_exception_mid_write_leaves_nothing(tmp_path, gen, monkeypatch):
    import adaptive_sparse.io as fmt

    calls = []
    real = fmt._write_file

    def failing(path, data):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        real(path, data)

    monkeypatch.setattr(fmt, "_write_file", failing)
    with pytest.raises(OSError, match="injected"):
        save_masks(tmp_path / "art", {0: random_mask(gen, 1, 2, 64)})
    assert calls == ["masks.safetensors", "manifest.json"]
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(fmt, "_write_file", real)
    first = save_masks(tmp_path / "art", {0: random_mask(gen, 1, 2, 64)})
    with pytest.raises(ValueError, match="already exists"):
        save_masks(first, {0: random_mask(gen, 1, 2, 64)})
    new = random_mask(gen, 1, 2, 64, p=0.9)
    save_masks(first, {0: new}, overwrite=True)
    assert torch.equal(load_masks(first).layer_masks()[0].to_dense(), new.to_dense())
    assert os.listdir(tmp_path) == ["art"]
    (tmp_path / "user").mkdir()
    with pytest.raises(ValueError, match="not written by adaptive-sparse"):
        save_masks(tmp_path / "user", {0: new}, overwrite=True)


def test_killed_writer_leaves_no_artifact(tmp_path):
    out = tmp_path / "art"
    script = textwrap.dedent(f"""
        import sys, time, torch
        import adaptive_sparse.io as fmt
        from adaptive_sparse.export import save_masks
        from adaptive_sparse.masks import BlockSparseMask
        real = fmt._write_file
        def slow(path, data):
            real(path, data)
            print("WROTE", path.name, flush=True)
            time.sleep(60)
        fmt._write_file = slow
        save_masks({str(out)!r}, {{0: BlockSparseMask.full(1, 2, block_size=16, q_len=64,
                                                            kv_len=64)}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert line.startswith("WROTE masks.safetensors"), line
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".art.partial-")
    with pytest.raises(ArtifactError, match="not an artifact"):
        load_masks(out)
    save_masks(out, {0: BlockSparseMask.full(1, 2, block_size=16, q_len=64, kv_len=64)})
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    assert load_masks(out).layers == [0]


def _trained_looking_gates(model, gen):
    from adaptive_sparse.gates import GateConfig, GateSet

    gs = GateSet(GateConfig.from_model(model, block_size=16))
    with torch.no_grad():
        for p in gs.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return gs


def test_gate_artifact_round_trip_gives_identical_logits(tmp_path, gen):
    from adaptive_sparse.export import load_gate_artifact, load_sparsifier, save_gate_artifact
    from adaptive_sparse.gates import GateProvider
    from adaptive_sparse.models import sparse_attention
    from adaptive_sparse.policies import Policy

    model = tiny_llama()
    gs = _trained_looking_gates(model, gen)
    policy = Policy(kind="top_k", k=2)
    path = save_gate_artifact(tmp_path / "g", gs, policy, model=model,
                              params={"trial": 3, "ppl_change": 0.01})
    art = load_gate_artifact(path)
    assert art.policy.to_dict() == policy.to_dict()
    assert art.gate_set.config.to_dict() == gs.config.to_dict()
    for (name, a), (name_b, b) in zip(art.gate_set.state_dict().items(), gs.state_dict().items()):
        assert name == name_b and a.dtype == b.dtype and torch.equal(a, b)
    ids = torch.randint(0, 97, (1, 80), generator=gen)

    @contextlib.contextmanager
    def live():
        with GateProvider(gs, policy, model) as gate, sparse_attention(model, gate, block_size=16):
            yield

    _check_attached_logits(model, path, ids, live, as_context=True)
    with pytest.raises(ArtifactError, match="num_layers: artifact 2, model 3"):
        load_sparsifier(tiny_llama(num_hidden_layers=3), path)
    with pytest.raises(ArtifactError, match="weights_sha256"):
        load_sparsifier(tiny_llama(seed=5), path)


def test_gate_artifact_refuses_inconsistent_content(tmp_path, gen):
    from adaptive_sparse.export import load_gate_artifact, save_gate_artifact
    from adaptive_sparse.policies import Policy

    model = tiny_llama()
    gs = _trained_looking_gates(model, gen)
    path = save_gate_artifact(tmp_path / "g", gs, Policy(kind="top_k", k=2), model=model)
    cases = [(("content", "policy", "kind"), "nope", "content.policy"),
             (("content", "gate_config", "num_heads"), 8, "content.gate_config"),
             (("content", "gate_config", "block_size"), 32, "block_size")]
    good = (path / "manifest.json").read_text()
    for field, value, needle in cases:
        (path / "manifest.json").write_text(good)
        rewrite_manifest(path, lambda m: _set(m, field, value), rehash=True)
        with pytest.raises(ArtifactError, match=needle):
            load_gate_artifact(path)
    # no base-model fingerprint (a gate folder whose writer did not know it): the attention
    # shapes are still checked against the model
    (path / "manifest.json").write_text(good)
    rewrite_manifest(path, lambda m: _set(m, ("model",), None), rehash=True)
    assert load_gate_artifact(path).fingerprint is None
    from adaptive_sparse.export import load_sparsifier
    with pytest.raises(ArtifactError, match="other attention shapes: num_layers"):
        load_sparsifier(tiny_llama(num_hidden_layers=3), path)


def test_export_masks_and_static_from_a_live_model(tmp_path, gen):
    from adaptive_sparse.export import load_sparsifier
    from adaptive_sparse.export.build import export_masks, export_static
    from adaptive_sparse.models import OracleProvider, PatternProvider, sparse_attention

    model = tiny_llama()
    seqs = torch.randint(0, 97, (2, 96), generator=gen)
    provider = PatternProvider("sliding_window", block_size=16, window=2)
    path = export_masks(model, seqs, provider, tmp_path / "m", block_size=16,
                        method="pattern:sliding_window", params={"window": 2})
    art = load_masks(path)
    assert art.layers == [0, 1] and art.manifest["content"]["inputs"]["seq_len"] == 96
    q = torch.randn(1, 4, 96, 16, generator=gen)
    direct = provider(0, q, q[:, :2])
    assert torch.equal(art.layer_masks()[0].to_dense(),
                       direct.expand_heads(4).to_dense().expand(2, -1, -1, -1))
    with torch.no_grad():
        with sparse_attention(model, provider, block_size=16):
            want = model(seqs).logits
        with load_sparsifier(model, path):
            got = model(seqs).logits
    assert torch.equal(got, want)

    oracle = OracleProvider({"kind": "top_k", "k": 2}, block_size=16, num_layers=2)
    calib = {64: torch.randint(0, 97, (3, 64), generator=gen)}
    held = {64: torch.randint(0, 97, (2, 64), generator=gen)}
    spath = export_static(model, calib, held, oracle, tmp_path / "s", block_size=16,
                          method="oracle", params={"k": 2}, min_fraction=0.5,
                          max_blocks_per_row=2)
    sart = load_masks(spath)
    rec = sart.manifest["content"]["static"]["recall"]["64"]
    live = sart.manifest["method"]["params"]["source_heldout_recall"]["64"]
    assert rec["docs"] == 2 and len(rec["per_layer"]) == 2 and 0 < rec["mean"] <= 1
    assert live["mean"] >= rec["mean"] - 1e-6  # the live oracle keeps at least as much
    assert int(sart.layer_masks(64)[0].kv_num_blocks.max()) <= 2
    assert sart.manifest["content"]["static"]["calibration_docs"] == 3


def test_cli_convert_verify_and_refusal(tmp_path, gen, capsys):
    from adaptive_sparse.export import export_main

    path = save_masks(tmp_path / "m", {0: random_mask(gen, 1, 2, 64)})
    assert export_main(["verify", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "masks" and info["files"]["masks.safetensors"] > 0
    for to in ("flex", "bsr", "dense"):
        assert export_main(["convert", str(path), "--to", to, "--out",
                            str(tmp_path / to)]) == 0
        assert (tmp_path / to / f"{to}.safetensors").is_file()
    capsys.readouterr()
    data = bytearray((path / "masks.safetensors").read_bytes())
    data[-1] ^= 1
    (path / "masks.safetensors").write_bytes(bytes(data))
    assert export_main(["verify", str(path)]) == 2
    assert "files.masks.safetensors: sha256 does not match" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main(["convert", str(path), "--to", "csr", "--out", str(tmp_path / "x")])


def test_export_and_verify_for_the_demo(tmp_path, gen):
    from adaptive_sparse.export.build import export_and_verify
    from adaptive_sparse.policies import Policy

    model = tiny_llama()
    gs = _trained_looking_gates(model, gen)
    res = export_and_verify(model, torch.randint(0, 97, (1, 96), generator=gen), gs,
                            Policy(kind="top_p", p=0.8), tmp_path / "demo")
    assert res["gate_logits_equal"] and res["masks_logits_equal"] and res["max_abs_diff"] == 0
    assert res["gate"]["kind"] == "gate" and res["masks"]["kind"] == "masks"
    assert 0 < res["gate"]["density"] < 1


def _cli(*args, cwd=None):
    exe = Path(sys.executable).with_name("adaptive-sparse")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd or REPO,
                          timeout=300)


def test_symlinked_artifact_files_are_refused_without_revealing_the_target(tmp_path, gen):
    path = save_masks(tmp_path / "m", {0: random_mask(gen, 1, 2, 64)})
    outside = tmp_path / "secret.safetensors"
    (path / "masks.safetensors").rename(outside)
    (path / "masks.safetensors").symlink_to(outside)  # same bytes, outside the artifact
    with pytest.raises(ArtifactError, match="files.masks.safetensors: is a symbolic link"):
        load_masks(path)
    (path / "masks.safetensors").unlink()
    (path / "masks.safetensors").symlink_to("/etc/passwd")
    res = _cli("export", "verify", str(path))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "files.masks.safetensors: is a symbolic link" in res.stderr
    size = str(os.path.getsize("/etc/passwd"))
    assert "passwd" not in res.stderr and size not in res.stderr
    (path / "masks.safetensors").unlink()
    (path / "masks.safetensors").symlink_to("../m/manifest.json")  # inside, still refused
    with pytest.raises(ArtifactError, match="symbolic link"):
        load_masks(path)
    (path / "masks.safetensors").unlink()
    os.mkfifo(path / "masks.safetensors")  # not a plain file: never opened for reading
    with pytest.raises(ArtifactError, match="not a plain file"):
        load_masks(path)


def test_manifest_symlink_is_refused(tmp_path, gen):
    path = save_masks(tmp_path / "m", {0: random_mask(gen, 1, 2, 64)})
    (path / "manifest.json").rename(tmp_path / "manifest.json")
    (path / "manifest.json").symlink_to(tmp_path / "manifest.json")
    with pytest.raises(ArtifactError, match="manifest.json: is a symbolic link"):
        load_masks(path)


@pytest.mark.parametrize("edit", [{"head_dim": 16384, "gate_dim": 16384},
                                  {"num_layers": 100_000}])
def test_gate_artifact_sizes_are_bounded_by_the_tensors_present(tmp_path, gen, edit):
    """A re-signed gate artifact declaring huge shapes is refused by comparing them with the
    tensors it holds, before a GateSet is allocated."""
    from adaptive_sparse.export import load_gate_artifact, save_gate_artifact
    from tests.test_gates import refused_quickly

    model = tiny_llama()
    path = save_gate_artifact(tmp_path / "g", _trained_looking_gates(model, gen),
                              {"kind": "top_k", "k": 2}, model=model)

    def grow(m):
        m["content"]["gate_config"].update(edit, rope_inv_freq=None)
        m["model"].update({k: v for k, v in edit.items() if k in m["model"]})

    rewrite_manifest(path, grow, rehash=True)
    refused_quickly(lambda: load_gate_artifact(path), ArtifactError)
    res = _cli("export", "verify", str(path))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "gates.safetensors" in res.stderr


def test_readers_see_old_or_new_artifact_during_overwrites(tmp_path):
    """A writer overwrites an artifact in a loop for 2 s (another process) while this process
    loads it in a loop: every load succeeds and is one of the two versions."""
    out = tmp_path / "art"
    full = BlockSparseMask.full(1, 2, block_size=16, q_len=256, kv_len=256)
    diag = BlockSparseMask.from_dense(diagonal_blocks(256, 256, 16)[None, None].expand(1, 2, -1, -1)
                                      .contiguous(), block_size=16, q_len=256, kv_len=256)
    save_masks(out, {0: full})
    script = textwrap.dedent(f"""
        import time
        from adaptive_sparse.export import save_masks
        from adaptive_sparse.masks import BlockSparseMask, diagonal_blocks
        full = BlockSparseMask.full(1, 2, block_size=16, q_len=256, kv_len=256)
        diag = BlockSparseMask.from_dense(diagonal_blocks(256, 256, 16)[None, None]
                                          .expand(1, 2, -1, -1).contiguous(), block_size=16,
                                          q_len=256, kv_len=256)
        print("READY", flush=True)
        end, n = time.time() + 2.0, 0
        while time.time() < end:
            save_masks({str(out)!r}, {{0: (diag, full)[n % 2]}}, overwrite=True)
            n += 1
        print("WROTE", n, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    assert proc.stdout.readline().startswith("READY")
    loads, seen, errors = 0, set(), []
    while proc.poll() is None:
        try:
            seen.add(round(load_masks(out).layer_masks()[0].density(), 6))
            loads += 1
        except Exception as e:  # noqa: BLE001 - every failure is collected and reported
            errors.append(f"{type(e).__name__}: {e}")
    written = int(proc.stdout.read().split()[-1])
    proc.stdout.close()
    assert proc.returncode == 0 and written > 10
    assert not errors, errors[:3]
    assert loads > 10 and seen <= {round(full.density(), 6), round(diag.density(), 6)}
    assert len(seen) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    import errno

    import adaptive_sparse.io as aio

    target = tmp_path / "out.json"
    aio.atomic_write_json(target, {"v": 1})

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(aio.os, "fsync", no_space)
    with pytest.raises(OSError, match="out.json: cannot write \\(no space left on the device\\); "
                                      "the previous file, if any, is unchanged") as info:
        aio.atomic_write_json(target, {"v": 2})
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_file_size_limit_mid_write_keeps_the_previous_artifact(tmp_path, gen):
    """A real write failure (RLIMIT_FSIZE: the kernel refuses bytes past the limit, like a full
    disk) while overwriting an artifact: the old artifact stays whole, no temporary is left."""
    out = tmp_path / "art"
    save_masks(out, {0: random_mask(gen, 1, 2, 64)})
    before = load_masks(out).layer_masks()[0]
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from adaptive_sparse.export import save_masks
        from adaptive_sparse.masks import BlockSparseMask
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        big = BlockSparseMask.full(1, 8, block_size=16, q_len=2048, kv_len=2048)
        try:
            save_masks({str(out)!r}, {{0: big}}, overwrite=True)
        except OSError as e:
            print("ERR", e)
            sys.exit(3)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert res.returncode == 3, res.stderr
    assert "cannot write" in res.stdout and "unchanged" in res.stdout
    assert load_masks(out).layer_masks()[0] == before
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_fingerprint_is_of_the_weights_not_the_source(tmp_path):
    """The same weights saved as a Hugging Face folder and loaded back give the same
    fingerprint; a change far into one tensor (past any sample) gives another."""
    from transformers import AutoModelForCausalLM

    from adaptive_sparse.models import model_fingerprint

    model = tiny_llama()
    model.save_pretrained(tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    back.config._adaptive_sparse_source = "elsewhere.gguf"
    assert model_fingerprint(back) == model_fingerprint(model)
    other = tiny_llama()
    with torch.no_grad():
        q = other.model.layers[1].self_attn.q_proj.weight
        q.view(-1)[q.numel() - 7] += 0.5  # past position 1000 of that tensor
    assert q.numel() > 1000
    assert model_fingerprint(other)["weights_sha256"] != model_fingerprint(model)["weights_sha256"]
    assert model_fingerprint(other)["config_sha256"] == model_fingerprint(model)["config_sha256"]


def test_load_sparsifier_check_relaxes_to_architecture(tmp_path, gen):
    from adaptive_sparse.export import load_sparsifier

    model = tiny_llama()
    path = save_masks(tmp_path / "m", {0: random_mask(gen, 1, 4, 64)}, model=model)
    tuned = tiny_llama(seed=5)
    with pytest.raises(ArtifactError, match="weights_sha256"):
        load_sparsifier(tuned, path)
    with load_sparsifier(tuned, path, check="architecture") as handle:
        assert handle.attached
    with pytest.raises(ArtifactError, match="num_layers"):
        load_sparsifier(tiny_llama(num_hidden_layers=3), path, check="architecture")
    with pytest.raises(ValueError, match="check: expected one of"):
        load_sparsifier(model, path, check="weights")


def test_cli_export_gate_refuses_bad_gate_folders_before_loading_the_model(tmp_path):
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"method": "gate", "params": {"policy": {"kind": "top_k",
                                                                          "k": 2}}}))
    gates = tmp_path / "g"
    gates.mkdir()
    (gates / "gates.json").write_text("{broken")
    (gates / "gates.safetensors").write_bytes(b"x")
    res = _cli("export", "gate", "--model", str(tmp_path / "no-model"), "--gates", str(gates),
               "--policy-file", str(policy), "--out", str(tmp_path / "art"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "gates.json: expected UTF-8 JSON" in res.stderr
    res = _cli("export", "gate", "--model", str(tmp_path / "no-model"), "--gates",
               str(tmp_path / "runs"), "--policy-file", str(policy), "--out", str(tmp_path / "a"))
    assert res.returncode == 2 and "gates: expected a gate checkpoint" in res.stderr
    assert not (tmp_path / "art").exists() and not (tmp_path / "a").exists()


def test_overwrite_without_rename_exchange_falls_back_to_two_renames(tmp_path, gen, monkeypatch):
    import adaptive_sparse.io as aio

    first = save_masks(tmp_path / "art", {0: random_mask(gen, 1, 2, 64)})
    assert aio.exchange(tmp_path / "art", tmp_path / "art") in (True, False)
    monkeypatch.setattr(aio, "exchange", lambda a, b: False)
    new = random_mask(gen, 1, 2, 64, p=0.9)
    save_masks(first, {0: new}, overwrite=True)
    assert load_masks(first).layer_masks()[0] == new
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
