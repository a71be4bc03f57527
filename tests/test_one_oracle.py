"""One oracle: `OracleProvider` is `patterns.oracle_with_maps` (the `oracle` pattern), equal to
the policy applied to the true block maps, and refuses non-finite q / k naming the layer."""

import pytest
import torch

from adaptive_sparse.attention.block_maps import block_attention_maps
from adaptive_sparse.models import OracleProvider, sparse_attention
from adaptive_sparse.patterns import make_pattern
from adaptive_sparse.policies import Policy

CASES = [({"kind": "top_k", "k": 2}, "sum", 32, 128, 128),
         ({"kind": "top_p", "p": 0.9}, "max", 16, 80, 112),   # queries at the end of the keys
         ({"kind": "density", "density": 0.3, "layer_schedule": "linear",
           "layer_scale_end": 2.0}, "sum", 16, 96, 96),
         ({"kind": "threshold", "tau": 0.05}, "max", 64, 200, 200)]


@pytest.mark.parametrize("policy,target,bs,n,m", CASES)
def test_oracle_provider_is_the_oracle_pattern(policy, target, bs, n, m):
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, n, 16, generator=gen), torch.randn(2, 2, m, 16, generator=gen)
    provider = OracleProvider(policy, target=target, block_size=bs, num_layers=3)
    got = provider(2, q, k)
    pattern = make_pattern("oracle", q_len=n, kv_len=m, num_heads=4, block_size=bs, batch=2,
                           q=q, k=k, policy=policy, target=target, layer_idx=2, num_layers=3)
    assert got == pattern
    bmax, bsum = block_attention_maps(q, k, block_size=bs)
    want = Policy.coerce(policy).to_mask(bsum if target == "sum" else bmax, q_len=n, kv_len=m,
                                         block_size=bs, layer_idx=2, num_layers=3,
                                         scores_are_probs=True)
    assert got == want
    assert provider.last_maps[0] is q and torch.equal(provider.last_maps[1], bsum)


@pytest.mark.parametrize("where", ["q", "k"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_oracle_provider_refuses_non_finite_inputs_naming_the_layer(where, value):
    q, k = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16)
    (q if where == "q" else k)[0, 1, 40, 3] = value
    with pytest.raises(ValueError, match=r"^q, k: expected finite values.*\(oracle, layer 5\)"):
        OracleProvider({"kind": "top_k", "k": 1}, block_size=16)(5, q, k)


def test_non_finite_q_in_a_model_is_refused_at_that_layer():
    from test_gates import tiny_llama

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    provider = OracleProvider({"kind": "top_k", "k": 2}, block_size=16, num_layers=2)
    with pytest.raises(ValueError, match=r"q, k: expected finite values.*layer 1\)"), \
            torch.no_grad(), sparse_attention(model, provider, block_size=16):
        model(torch.randint(0, 128, (1, 64)))
