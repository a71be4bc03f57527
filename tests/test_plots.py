"""Figures: one colour per method everywhere, labels that cannot overprint, atomic PNGs."""

from __future__ import annotations

import pytest

from adaptive_sparse.plots import (
    METHOD_COLORS,
    method_family,
    method_style,
    plot_frontier,
    plot_layer_density,
    plot_tradeoff,
)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("a,b", [
    ("gate/threshold", "gate (learned), threshold"), ("gate", "gate/top_k"),
    ("oracle (block sum), density", "oracle/top_p"),
    ("sliding_window", "sliding_window 448 + sink block"), ("bigbird", "bigbird 384 + 1 global"),
])
def test_one_colour_per_method_family(a, b):
    assert method_family(a) == method_family(b)
    assert method_style(a)["color"] == method_style(b)["color"]


def test_families_have_distinct_colours():
    assert len(set(METHOD_COLORS.values())) == len(METHOD_COLORS)
    assert method_family("longformer 512") == "longformer"  # not "long..." of another family
    assert method_style("mystery")["color"] == method_style("mystery")["color"]


def test_tradeoff_names_coinciding_points_in_the_legend(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"name": "sliding_window 512", "density": 0.26, "ppl_change": 0.08},
            {"name": "longformer 512", "density": 0.26, "ppl_change": 0.08},
            {"name": "gate (learned)", "density": 0.25, "ppl_change": 0.03}]
    seen = {}
    real_close = plt.close

    def keep(fig=None):
        seen["fig"] = fig
        real_close(fig)

    plt.close = keep
    try:
        path = plot_tradeoff(rows, tmp_path / "t.png", title="t")
    finally:
        plt.close = real_close
    assert path.read_bytes()[:8] == PNG
    ax = seen["fig"].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[1] == "longformer 512 (same point as sliding_window 512)"
    assert not ax.texts  # no annotation beside any point


def test_layer_density_and_frontier_write_pngs(tmp_path):
    p = plot_layer_density({"gate": [0.2] * 30, "oracle": [0.25] * 30}, tmp_path / "l.png",
                           target=0.25)
    assert p.read_bytes()[:8] == PNG
    rows = [{"method": m, "density": d, "ppl_change": c, "front_method": True}
            for m in ("gate/top_k", "sliding_window") for d, c in ((0.2, 0.1), (0.4, 0.02))]
    p = plot_frontier(rows, tmp_path / "f.png", budgets=[0.01, 0.05])
    assert p.read_bytes()[:8] == PNG


def test_plot_into_a_file_path_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OSError, match="cannot write"):
        plot_layer_density({"gate": [0.2]}, tmp_path / "f" / "l.png")


def test_threshold_and_top_p_policies_share_a_colour_with_their_own_line_styles():
    a, b = method_style("gate/threshold"), method_style("gate/top_p")
    assert a["color"] == b["color"] == METHOD_COLORS["gate"]
    assert a["linestyle"] != b["linestyle"]


def test_frontier_draws_dense_baselines_as_labelled_vertical_lines(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"method": m, "latency_ms": x, "ppl_change": c, "front_method": True}
            for m in ("gate/threshold", "gate/top_p", "sliding_window")
            for x, c in ((20.0, 0.01), (60.0, 0.001))]
    seen, real_close = {}, plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (seen.setdefault("fig", fig),
                                                       real_close(fig)))
    p = plot_frontier(rows, tmp_path / "f.png", cost="latency_ms", budgets=[0.01],
                      baselines={"SDPA cuDNN": 102.47, "ours, full mask": 114.82},
                      note="Pareto fronts only")
    assert p.read_bytes()[:8] == PNG
    ax = seen["fig"].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[-2:] == ["dense: SDPA cuDNN 102.5 ms", "dense: ours, full mask 114.8 ms"]
    assert {t.get_text() for t in ax.texts} >= {"SDPA cuDNN", "ours, full mask"}
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["dense: SDPA cuDNN 102.5 ms"].get_xdata()) == [102.47, 102.47]
    assert lines["gate/threshold"].get_linestyle() != lines["gate/top_p"].get_linestyle()
    assert ax.get_title().endswith("\nPareto fronts only") and ax.get_xlim()[1] > 114.82
    for bad in ({"SDPA": -1.0}, {"SDPA": float("nan")}, {"SDPA": "fast"}, [1.0]):
        with pytest.raises(ValueError, match="baselines: expected a mapping of name -> cost > 0"):
            plot_frontier(rows, tmp_path / "g.png", cost="latency_ms", baselines=bad)
    assert not (tmp_path / "g.png").exists()
