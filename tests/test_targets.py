"""Featurization cache: targets vs an fp64 oracle, pooled features, round trip, resume, keys."""

import json

import pytest
import torch

from adaptive_sparse.attention.block_maps import block_attention_maps
from adaptive_sparse.gates.network import POOLINGS, pool_blocks
from adaptive_sparse.gates.provider import QKCapture
from adaptive_sparse.models import model_fingerprint
from gating.targets import GateCache, cache_key, featurize

BS = 16


def tiny_llama(seed=0, heads=4, kv_heads=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                      intermediate_size=128, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


def fp64_block_maps(q, k, bs):
    """Dense fp64 softmax (causal), pooled per tile: (row-normalized block max, block sum)."""
    B, Hq, N, D = q.shape
    k = k.repeat_interleave(Hq // k.shape[1], dim=1)
    s = q.double() @ k.double().transpose(-1, -2) / D ** 0.5
    s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, -1)
    nb = -(-N // bs)
    pad = nb * bs - N
    p = torch.nn.functional.pad(p, (0, pad, 0, pad)).view(B, Hq, nb, bs, nb, bs)
    bmax = p.amax((3, 5))
    rows = torch.clamp(N - torch.arange(nb) * bs, max=bs).double()
    bsum = p.sum((3, 5)) / rows[:, None]
    return bmax / bmax.sum(-1, keepdim=True), bsum


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 128, (3, 72), generator=torch.Generator().manual_seed(1))


def featurize_tiny(model, tokens, path, **kw):
    args = dict(model_name="tiny", corpus="random", split="train", block_size=BS,
                progress=False) | kw
    return featurize(model, tokens, path, **args)


@pytest.mark.parametrize("chunk", [1, 1 << 25])
def test_block_maps_equal_fp64_oracle(chunk):
    g = torch.Generator().manual_seed(chunk % 997)
    q = torch.randn(2, 4, 75, 16, generator=g)
    k = torch.randn(2, 2, 75, 16, generator=g) * 2
    bmax, bsum = block_attention_maps(q, k, block_size=BS, chunk_elements=chunk)
    want_max, want_sum = fp64_block_maps(q, k, BS)
    torch.testing.assert_close(bmax.double(), want_max, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bsum.double(), want_sum, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,m,chunk", [(75, 75, 1), (40, 90, 16 * 6 * 90), (64, 64, 1 << 25)])
def test_block_maps_chunking_is_invisible(n, m, chunk):
    g = torch.Generator().manual_seed(n + m)
    q, k = torch.randn(1, 6, n, 16, generator=g) * 2, torch.randn(1, 2, m, 16, generator=g)
    got = block_attention_maps(q, k, block_size=BS, chunk_elements=chunk)
    want = block_attention_maps(q, k, block_size=BS, chunk_elements=1 << 30)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)


def test_cache_targets_and_features_match_fp64_oracle(model, tokens, tmp_path):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    featurize_tiny(model, tokens, tmp_path / "c")
    cache = GateCache(tmp_path / "c", verify=True)
    assert len(cache) == 3 and cache.seq_len == 72 and cache.block_size == BS
    assert cache.shapes["num_heads"] == 4 and cache.shapes["num_kv_heads"] == 2
    for i in (0, 2):
        with QKCapture(model) as cap, torch.no_grad():
            model(tokens[i:i + 1])
        data = cache.load(i)
        assert torch.equal(data["tokens"], tokens[i])
        cos, sin = model.model.rotary_emb(cap.q[0], torch.arange(72)[None])
        for layer in range(2):
            q, k = cap.q[layer], cap.k[layer]
            for pool, want in pool_blocks(q.double(), BS, POOLINGS).items():
                torch.testing.assert_close(data[f"L{layer}.q.{pool}"].double(), want[0],
                                           rtol=1e-5, atol=1e-6)
            for pool, want in pool_blocks(k.double(), BS, POOLINGS).items():
                torch.testing.assert_close(data[f"L{layer}.k.{pool}"].double(), want[0],
                                           rtol=1e-5, atol=1e-6)
            qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
            want_max, want_sum = fp64_block_maps(qr, kr, BS)
            assert data[f"L{layer}.block_max"].dtype == torch.float16
            torch.testing.assert_close(data[f"L{layer}.block_max"].double(), want_max[0],
                                       rtol=2e-3, atol=1e-4)
            torch.testing.assert_close(data[f"L{layer}.block_sum"].double(), want_sum[0],
                                       rtol=2e-3, atol=1e-4)


def test_resume_skips_verified_shards_and_redoes_bad_ones(model, tokens, tmp_path):
    path = tmp_path / "c"
    featurize_tiny(model, tokens[:2], path)
    first = {p.name: p.stat().st_mtime_ns for p in path.glob("*.safetensors")}
    bad = path / "seq_00001.safetensors"
    bad.write_bytes(b"garbage")
    manifest = featurize_tiny(model, tokens, path)
    assert manifest["complete"] and len(manifest["shards"]) == 3
    assert (path / "seq_00000.safetensors").stat().st_mtime_ns == first["seq_00000.safetensors"]
    assert bad.read_bytes() != b"garbage"
    GateCache(path, verify=True)


def test_interrupted_cache_is_refused_until_resumed(model, tokens, tmp_path):
    path = tmp_path / "c"
    featurize_tiny(model, tokens[:1], path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["complete"] = False
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="^directory: expected a complete cache"):
        GateCache(path)
    featurize_tiny(model, tokens[:1], path)
    assert len(GateCache(path)) == 1


@pytest.mark.parametrize("change,field", [
    (dict(split="validation"), "split"),
    (dict(corpus="other"), "corpus"),
    (dict(block_size=32), "block_size"),
    (dict(model_name="other"), "model"),
])
def test_featurize_refuses_other_key(model, tokens, tmp_path, change, field):
    featurize_tiny(model, tokens[:1], tmp_path / "c")
    with pytest.raises(ValueError, match=rf"^{field}: the cache at"):
        featurize_tiny(model, tokens[:1], tmp_path / "c", **change)


def test_featurize_refuses_other_model_and_seq_len(model, tokens, tmp_path):
    featurize_tiny(model, tokens[:1], tmp_path / "c")
    with pytest.raises(ValueError, match=r"^fingerprint: .*different model"):
        featurize_tiny(tiny_llama(seed=5), tokens[:1], tmp_path / "c")
    with pytest.raises(ValueError, match=r"^seq_len: the cache at"):
        featurize_tiny(model, tokens[:1, :64], tmp_path / "c")


def test_cache_refused_on_expected_key_mismatch(model, tokens, tmp_path):
    featurize_tiny(model, tokens[:1], tmp_path / "c")
    good = cache_key(model="tiny", fingerprint=model_fingerprint(model), corpus="random",
                     split="train", seq_len=72, block_size=BS)
    GateCache(tmp_path / "c", good)
    with pytest.raises(ValueError, match=r"^seq_len: the cache at .* seq_len=72, expected 128"):
        GateCache(tmp_path / "c", good | {"seq_len": 128})
    with pytest.raises(ValueError, match=r"^fingerprint: "):
        GateCache(tmp_path / "c", good | {"fingerprint": model_fingerprint(tiny_llama(seed=3))})


def test_bad_sequences_raise(model, tmp_path):
    with pytest.raises(ValueError, match="^sequences: expected"):
        featurize_tiny(model, torch.randn(2, 32), tmp_path / "c")
    with pytest.raises(ValueError, match="^sequences: expected"):
        featurize_tiny(model, torch.randint(0, 128, (32,)), tmp_path / "c")
