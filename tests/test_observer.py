"""The attention observer: `observe_attention` (dense SDPA, every layer observed),
`sparse_attention(observer=)`, `dense_attention` against fp64, and `featurize` through the
observer against fp64 references (a tiny Gemma 3 with a sliding-window layer, SmolLM2)."""

import copy

import pytest
import torch

from adaptive_sparse.gates.network import POOLINGS, pool_blocks
from adaptive_sparse.gates.provider import QKCapture
from adaptive_sparse.models import (
    ATTN_NAME,
    dense_attention,
    observe_attention,
    sparse_attention,
)
from gating.targets import GateCache, featurize
from test_targets import BS, fp64_block_maps, tiny_llama

WINDOW = 16


def tiny_gemma3(seed=0):
    """Two layers: 0 sliding-window (WINDOW keys), 1 global."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, max_position_embeddings=256, sliding_window=WINDOW,
                           layer_types=["sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(cfg).eval()


MODELS = {"llama": tiny_llama, "gemma3": tiny_gemma3}


def fp64_eager(model):
    ref = copy.deepcopy(model).double()
    ref.set_attn_implementation("eager")
    return ref


def expected_windows(model):
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * 2
    return [WINDOW if t == "sliding_attention" else None for t in types]


def fp64_dense(q, k, v, scale, window):
    """Causal (end-aligned) softmax attention in fp64 with an explicit [N, M] mask."""
    n, m = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    pos = torch.arange(n)[:, None] + m - n
    cols = torch.arange(m)[None, :]
    keep = (cols <= pos) & ((cols > pos - window) if window else True)
    s = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("n,m,window,hq,hkv", [
    (33, 33, None, 4, 2), (1, 40, None, 4, 2), (10, 40, None, 4, 4), (40, 40, 16, 4, 2),
    (10, 40, 16, 2, 2), (40, 40, 64, 4, 1), (1, 40, 16, 4, 2),
])
def test_dense_attention_vs_fp64(n, m, window, hq, hkv):
    g = torch.Generator().manual_seed(n * 100 + m)
    q = torch.randn(2, hq, n, 16, generator=g)
    k, v = torch.randn(2, hkv, m, 16, generator=g), torch.randn(2, hkv, m, 16, generator=g)
    got = dense_attention(q, k, v, scale=0.3, window=window)
    want = fp64_dense(q, k, v, 0.3, window)
    assert got.shape == (2, hq, n, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_observer_sees_every_layer_and_dense_sdpa_matches_fp64(kind):
    model = MODELS[kind]()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = fp64_eager(model)(ids).logits
        calls = []
        with observe_attention(model, calls.append):
            assert model.config._attn_implementation == ATTN_NAME
            got = model(ids).logits
    assert model.config._attn_implementation != ATTN_NAME
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert [c.layer_idx for c in calls] == [0, 1]
    for c, window in zip(calls, expected_windows(model)):
        assert c.window == window and c.kind == ("global" if window is None else "sliding")
        assert c.q.shape == (2, 4, 40, 16) and c.k.shape == c.v.shape == (2, 2, 40, 16)
        assert c.q_offset == 0 and c.scale == model.model.layers[c.layer_idx].self_attn.scaling


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_observed_decode_with_cache_matches_fp64(kind):
    """Prefill 30, then 10 queries over 40 keys, then one: end-aligned causal (and window)."""
    model = MODELS[kind]()
    ids = torch.randint(0, 128, (1, 41), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = fp64_eager(model)(ids).logits
        calls = []
        with observe_attention(model, calls.append):
            first = model(ids[:, :30], use_cache=True)
            second = model(ids[:, 30:40], cache=first.cache, use_cache=True)
            third = model(ids[:, 40:], cache=second.cache, use_cache=True)
    got = torch.cat([first.logits, second.logits, third.logits], 1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    last = [c for c in calls if c.layer_idx == 1]  # global in both models
    assert [(c.kind, c.q.shape[2], c.q_offset) for c in last] == \
        [("global", 30, 0), ("global", 10, 30), ("global", 1, 40)]


def test_sparse_attention_observer_sees_sliding_layers_the_provider_does_not():
    model = tiny_gemma3()
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(5))
    asked, seen = [], []

    def provider(layer_idx, q, k):
        asked.append(layer_idx)
        return None

    with torch.no_grad():
        with observe_attention(model, lambda c: None):
            want = model(ids).logits
        with sparse_attention(model, provider, block_size=16, observer=seen.append):
            got = model(ids).logits
    assert asked == [1] and [(c.layer_idx, c.kind) for c in seen] == [(0, "sliding"), (1, "global")]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_observer_raises_and_failure_restores_attention():
    model = tiny_llama()
    with pytest.raises(TypeError, match="^observer: expected a callable"):
        with observe_attention(model, None):
            pass
    with pytest.raises(TypeError, match="^observer: expected a callable"):
        with sparse_attention(model, None, observer=3):
            pass

    def broken(call):
        raise RuntimeError("observer failed")

    before = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="observer failed"), torch.no_grad():
        with observe_attention(model, broken):
            model(torch.randint(0, 128, (1, 8)))
    assert model.config._attn_implementation == before


def _check_features(data, layer, q, k):
    """Cached pooled features of layer `layer` vs fp64 pooling of pre-rotary q, k [1, H, N, D]."""
    for which, x in (("q", q), ("k", k)):
        for pool, want in pool_blocks(x.double(), BS, POOLINGS).items():
            torch.testing.assert_close(data[f"L{layer}.{which}.{pool}"].double(), want[0],
                                       rtol=1e-5, atol=1e-5)


def _check_targets(data, layer, q, k, scale):
    """Cached targets vs dense fp64 block maps of post-rotary q, k (full causal attention)."""
    want_max, want_sum = fp64_block_maps(q.double() * (scale * q.shape[-1] ** 0.5), k, BS)
    assert data[f"L{layer}.block_max"].dtype == torch.float16
    torch.testing.assert_close(data[f"L{layer}.block_max"].double(), want_max[0],
                               rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(data[f"L{layer}.block_sum"].double(), want_sum[0],
                               rtol=2e-3, atol=1e-4)


def test_featurize_gemma3_observes_sliding_layers(tmp_path):
    """Both layers get targets; the sliding-window layer's are those of full causal attention
    over its q/k (gating/targets.py's rule), from an fp64 run of the same model."""
    model = tiny_gemma3()
    tokens = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(6))
    featurize(model, tokens, tmp_path / "c", model_name="tiny-g3", corpus="random",
              split="train", block_size=BS, progress=False)
    cache = GateCache(tmp_path / "c", verify=True)
    ref = fp64_eager(model)
    for i in range(2):
        calls = []
        with QKCapture(ref) as cap, observe_attention(ref, calls.append), torch.no_grad():
            ref(tokens[i:i + 1])
        data = cache.load(i)
        assert [c.kind for c in calls] == ["sliding", "global"]
        for c in calls:
            _check_features(data, c.layer_idx, cap.q[c.layer_idx], cap.k[c.layer_idx])
            _check_targets(data, c.layer_idx, c.q, c.k, c.scale)


def test_featurize_smollm2_matches_fp64_reference(smollm2, tmp_path):
    """SmolLM2 at 128 tokens: features and targets of every layer equal fp64 pooling and fp64
    block maps of the q/k that the model's own attention implementation produces."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, tokenizer = smollm2
    ids = tokenizer("The observer sees every layer of the model. " * 20,
                    return_tensors="pt").input_ids[:, :128]
    assert ids.shape == (1, 128)
    manifest = featurize(model, ids, tmp_path / "c", model_name="smollm2-135m", corpus="text",
                         split="train", block_size=BS, progress=False)
    assert manifest["complete"] and model.config._attn_implementation != ATTN_NAME
    data = GateCache(tmp_path / "c", verify=True).load(0)
    with QKCapture(model) as cap, torch.no_grad():
        model(ids)
    cos, sin = model.model.rotary_emb(cap.q[0], torch.arange(128)[None])
    layers = model.config.num_hidden_layers
    assert {f"L{n}.block_max" for n in range(layers)} <= set(data)
    for layer in range(layers):
        q, k = cap.q[layer], cap.k[layer]
        _check_features(data, layer, q, k)
        qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
        _check_targets(data, layer, qr, kr, model.model.layers[layer].self_attn.scaling)
