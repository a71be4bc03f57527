"""The decode path as a generation drives it (issue 15): a cache that grows one token per step
from mid-block, several layers sharing the kernels' workspaces, batches 1 and 2 and a ragged
batch, through benchmarks/decode_check.py (the GPU check's CPU dry run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from marks import needs_triton  # tests/ is on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@needs_triton
def test_generation_loop_fused_gate_and_kernel_match_the_references(tmp_path):
    """Each step and layer: the fused gate's selection equals the eager gate's and the
    one-program-per-row step's; the kernel (fused merge with the gate's hint, merge launch, one
    split, no hint) equals decode_reference on the selection; the cache crosses a block."""
    import decode_check

    out = tmp_path / "check.json"
    rc = decode_check.main(["--device", "cpu", "--dtype", "float16", "--context", "100",
                            "--steps", "8", "--layers", "2", "--heads", "4", "--kv-heads", "2",
                            "--head-dim", "16", "--block-size", "16", "--density", "0.5",
                            "--batches", "1,2", "--ragged", "21", "--json", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and res["ok"] and not res["mismatches"], res
    assert res["checked"]["selection fused vs eager"] == 8 * 2 * 2
    assert res["checked"]["output merge launch"] == 8 * 2 * 2
    assert res["checked"]["ragged output fused merge"] == 8


@needs_triton
def test_gate_step_programs_per_row_never_change_the_selection():
    """decode_gate_select(programs=...) (1: a row in one program; more: the arrival count
    across programs) gives the same tables; a bad count names the argument."""
    import torch

    from adaptive_sparse.attention.triton.decode_gate import decode_gate_select
    from adaptive_sparse.gates.decode import DecodeGate, DecodeGateConfig

    torch.manual_seed(0)
    gate = DecodeGate(DecodeGateConfig(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                                       block_size=16, init="random"))
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 300, 16)
    kg = torch.zeros(2, 2, 32, gate.config.gate_dim)
    kg[:, :, :18] = gate.project_keys(gate.pooled_keys(k[:, :, :288])).detach()
    got = [decode_gate_select(q, k, gate.wq.detach(), gate.wk.detach(), kg, top_k=5,
                              block_size=16, poolings=gate.config.k_pooling,
                              q_scale=gate.config.gate_dim ** -0.5, programs=p)
           for p in (1, 3, 8)]
    for num, idx in got[1:]:
        assert torch.equal(num, got[0][0]) and torch.equal(idx, got[0][1])
    with pytest.raises(ValueError, match="programs"):
        decode_gate_select(q, k, gate.wq.detach(), gate.wk.detach(), kg, top_k=5,
                           block_size=16, poolings=gate.config.k_pooling, q_scale=1.0,
                           programs=0)
