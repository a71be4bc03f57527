"""benchmarks/attention.py on a masks artifact (a trained gate's per-layer masks), run on the
Triton interpreter with small shapes: every row checked against the fp64 oracle."""

from __future__ import annotations

import pytest
import torch

from marks import needs_interpreter  # tests/ is on sys.path


def _artifact(tmp_path, heads):
    from adaptive_sparse.export.masks import save_masks
    from adaptive_sparse.masks import BlockSparseMask, block_causal, diagonal_blocks

    g = torch.Generator().manual_seed(3)
    n, bs = 200, 64
    allowed = block_causal(n, n, bs)
    masks = {}
    for layer in range(2):
        keep = (torch.rand(1, heads, *allowed.shape, generator=g) < 0.5) & allowed
        keep |= diagonal_blocks(n, n, bs)
        keep[..., :, 0] = True
        if layer == 1:
            keep[0, 0, 1:] = diagonal_blocks(n, n, bs)[1:]  # one head: diagonal only
        masks[layer] = BlockSparseMask.from_dense(keep, block_size=bs, q_len=n, kv_len=n)
    return save_masks(tmp_path / "art", masks, method="test")


@needs_interpreter
@pytest.mark.parametrize("heads", [9, 3])
def test_artifact_case_checks_every_layer(tmp_path, heads):
    from benchmarks import attention

    path = _artifact(tmp_path, heads)
    masks = attention.artifact_masks(str(path))
    assert [label.split()[-1] for label, _ in masks] == ["L0", "L1"]
    logged = []
    gen = torch.Generator().manual_seed(0)
    rows = attention.run_case("smollm2-135m", 200, 64, [], gen, None, logged.append,
                              masks=masks)
    layer_rows = [r for r in rows if r["provider"] == "ours"]
    assert [r["target_density"] for r in layer_rows] == [label for label, _ in masks]
    assert all(r["mask_heads"] == heads for r in layer_rows)
    assert all(r["ok"] and r["err"] < 1e-2 for r in rows)
    assert [r["density"] for r in layer_rows] == pytest.approx([m.density() for _, m in masks])


def test_best_dense_names_the_fastest_backend_in_every_table():
    from benchmarks import attention
    from benchmarks.common import best_dense

    assert best_dense({"cudnn": 1.5, "flash": 2.5}) == ("cudnn", 1.5)
    assert best_dense({"cudnn": 3.0, "flash": 2.5}) == ("flash", 2.5)
    env = {"device": "dev", "torch": "t", "triton": "tr", "cuda": "c", "cudnn": 1,
           "matmul_bf16_tflops": 700.0, "copy_tb_per_s": 4.0}
    rows = [dict(shape=s, Hq=4, Hkv=1, D=d, N=8192, block_size=128, sdpa_ms=sdpa,
                 best_dense=best_dense(sdpa)[0], best_dense_ms=best_dense(sdpa)[1],
                 best_dense_tflops=600.0, provider="ours", density=0.5, ms=1.0, tflops=500.0,
                 err=2e-3, ok=True, speedup_vs_dense=best_dense(sdpa)[1] / 1.0)
            for s, d, sdpa in (("llama3-8b", 128, {"cudnn": 1.5, "flash": 2.5}),
                               ("gemma3-270m", 256, {"cudnn": 3.0, "flash": 2.5}))]
    md = attention.markdown(env, rows, [], [])
    assert md.count("| N | density |") == 2  # one table per shape / head_dim
    assert "SDPA-cudnn ms | SDPA-flash ms | best dense" in md
    assert "| cudnn 600 TFLOP/s | 1.50 |" in md and "| flash 600 TFLOP/s | 2.50 |" in md


@needs_interpreter
def test_exp2_poly_variants_side_by_side(tmp_path):
    """`--exp2-poly`: every fraction of the dense kernel and the mask path, bf16 and FP8, checked
    against fp64, x MUFU relative to fraction 0; the tables and JSON written by main."""
    import json

    from benchmarks import attention

    md, js = tmp_path / "a.md", tmp_path / "a.json"
    assert attention.main(["--shapes", "smollm2-135m", "--seqlens", "128", "--densities", "0.5",
                           "--block-sizes", "128", "--no-flex", "--exp2-poly", "0,0.5",
                           "--json", str(js), "--md", str(md)]) == 0
    rows = json.loads(js.read_text())["exp2_poly"]
    assert [(r["precision"], r["fraction"]) for r in rows] == [
        ("bf16", 0.0), ("bf16", 0.5), ("fp8", 0.0), ("fp8", 0.5)] * 2
    assert [r["density"] for r in rows[:4]] == ["dense kernel"] * 4
    assert all(r["ok"] and r["x_mufu"] > 0 for r in rows)
    assert all(r["err"] < 1e-3 for r in rows if r["precision"] == "bf16")
    assert rows[1]["err"] > rows[0]["err"]  # the polynomial ran (fp32 here: its 7.5e-5 shows)
    text = md.read_text()
    assert "Exponentials on the FMA pipes" in text and "| bf16 | 1.0 (dense kernel) | 0.5 |" in text


def test_exp2_poly_flag_refuses_other_fractions(capsys):
    from benchmarks import attention

    with pytest.raises(SystemExit) as e:
        attention.main(["--exp2-poly", "0,0.3", "--no-flex"])
    assert e.value.code == 2
    assert "--exp2-poly: exp2_poly: expected one of" in capsys.readouterr().err
