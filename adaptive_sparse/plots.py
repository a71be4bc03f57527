"""PNG figures (matplotlib, Agg backend), one colour per method everywhere.

`METHOD_COLORS` is the one palette: every figure of the project (the demo's tradeoff, per-layer
densities, sweep frontiers, the README's quality figure) colours a method by `method_style`, so
the learned gate is red and the oracle black in every panel. Figures are written atomically.
"""

from __future__ import annotations

import io
import math
import zlib
from pathlib import Path

import torch

# family -> colour (tab10 and friends); the gate red, the oracle black, dense grey
METHOD_COLORS = {
    "gate": "#d62728",
    "oracle": "#000000",
    "dense": "#7f7f7f",
    "sliding_window": "#1f77b4",
    "longformer": "#17becf",
    "bigbird": "#ff7f0e",
    "strided": "#2ca02c",
    "lsh": "#bcbd22",
    "hierarchical": "#9467bd",
    "vertical_slash": "#8c564b",
    "antidiagonal": "#e377c2",
}
# ablation gate sets ("gate[NAME]"): reds and browns no family of the palette uses
_ABLATION_COLORS = ("#ff9896", "#8b0000", "#f7b6d2", "#c49c94", "#ad494a", "#e7969c")
_MARKERS = {"gate": "o", "oracle": "s", "dense": "D", "sliding_window": "v", "longformer": "^",
            "bigbird": "<", "strided": ">", "lsh": "*", "hierarchical": "P",
            "vertical_slash": "X", "antidiagonal": "d"}


def method_family(name: str) -> str:
    """The family of a method label: "gate/threshold", "gate (learned), density" -> "gate";
    "sliding_window 512 + sink" -> "sliding_window"; unknown labels are their own family."""
    head = str(name).strip().lower()
    for family in sorted(METHOD_COLORS, key=len, reverse=True):
        if head == family or head.startswith((family + "/", family + " ", family + "(",
                                               family + ",")):
            return family
    return head


def method_style(name: str) -> dict:
    """matplotlib keyword arguments for a method's line or points: its family's colour and
    marker; the gate drawn thick, the oracle dashed; a threshold / top-p policy of a family is
    the same colour with its own line style."""
    family = method_family(name)
    color = METHOD_COLORS.get(family)
    if family.startswith("gate["):  # an ablation gate set, "gate[NAME]...": shades of the gate
        color = _ABLATION_COLORS[zlib.crc32(family.encode()) % len(_ABLATION_COLORS)]
    if color is None:  # a method outside the palette: a stable colour from its name
        color = f"C{zlib.crc32(family.encode()) % 10}"
    style = {"color": color, "marker": _MARKERS.get(family, "o")}
    if family == "gate":
        style["lw"] = 2.2
    if family == "oracle":
        style["linestyle"] = "--"
    if "threshold" in str(name) or "top_p" in str(name):
        style["linestyle"] = "-." if family == "oracle" else ":" if family != "gate" else "-"
        if family == "gate" and "top_p" in str(name):
            style["linestyle"] = "-."
        style["markerfacecolor"] = "white"
    elif family == "gate" and "density" in str(name):
        style["linestyle"] = "--"
    return style


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out) -> Path:
    from adaptive_sparse.io import atomic_write_bytes

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    plt.close(fig)
    return atomic_write_bytes(out, buf.getvalue())


def plot_block_attention(block_map: torch.Tensor, mask: torch.Tensor, out, *, title: str = "",
                         mask_title: str = "mask") -> Path:
    """Two heatmaps side by side: block_map float [Qb, Kb] (true attention mass per tile, log
    scale) and mask bool [Qb, Kb] (tiles the method computes, with the recall it reaches)."""
    if block_map.dim() != 2 or mask.shape != block_map.shape:
        raise ValueError(f"mask: expected the shape of block_map {tuple(block_map.shape)}, got "
                         f"{tuple(mask.shape)}")
    plt = _pyplot()
    m = block_map.float().cpu()
    keep = mask.bool().cpu()
    recall = float((m * keep).sum() / m.sum().clamp_min(1e-30))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    shown = torch.log10(m.clamp_min(1e-6))
    im = axes[0].imshow(shown.numpy(), cmap="magma", vmin=-6, vmax=0, interpolation="nearest")
    axes[0].set_title("true block attention (log10 mass)")
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    axes[1].imshow(keep.numpy(), cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
    qb, kb = keep.shape
    causal = torch.ones(qb, kb, dtype=torch.bool).tril(kb - qb)  # end-aligned block triangle
    density = float((keep & causal).sum()) / max(1, int(causal.sum()))
    axes[1].set_title(f"{mask_title}: density {density:.2f}, recall {recall:.3f}")
    for ax in axes:
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    if title:
        fig.suptitle(title)
    return _save(plt, fig, out)


def plot_tradeoff(results: list[dict], out, *, title: str = "") -> Path:
    """Perplexity change (%) against density, one point per result (dicts with keys name,
    density, ppl_change), coloured by method. Names go in the legend, never beside the points,
    so points that coincide (two patterns with the same mask) cannot overprint their labels;
    the legend marks such groups "(same point as ...)"."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 4.6))
    seen: dict[tuple, str] = {}
    for r in results:
        if r.get("density") is None:
            continue
        x, y = r["density"], 100 * r["ppl_change"]
        key = (round(x, 3), round(y, 2))
        label = r["name"] if key not in seen else f"{r['name']} (same point as {seen[key]})"
        seen.setdefault(key, r["name"])
        style = method_style(r["name"])
        ax.scatter([x], [y], s=70 if label != r["name"] else 40, label=label, zorder=3,
                   marker=style["marker"], edgecolors=style["color"],
                   facecolors=style.get("markerfacecolor", style["color"]))
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("density (share of causal blocks computed)")
    ax.set_ylabel("perplexity change vs dense (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if title:
        ax.set_title(title)
    return _save(plt, fig, out)


def plot_layer_density(per_layer: dict[str, list[float]], out, *, title: str = "",
                       target: float | None = None) -> Path:
    """Density per layer, one line per method (name -> [density of layer 0, 1, ...]), with the
    target density as a dotted line: where a method spends its budget across depth."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 3.8))
    for name, dens in per_layer.items():
        style = method_style(name)
        ax.plot(range(len(dens)), dens, label=name, ms=4, **style)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", lw=1, label=f"target {target:g}")
    ax.set_xlabel("layer")
    ax.set_ylabel("density")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if title:
        ax.set_title(title)
    return _save(plt, fig, out)


# line styles of dense baselines in plot_frontier, in the order given
# (budgets are dotted: no baseline is)
_BASELINE_STYLES = ("--", "-.", (0, (6, 2, 1, 2, 1, 2)), (0, (10, 3)), (0, (3, 1, 3, 4)))


def _check_baselines(baselines) -> dict[str, float]:
    from adaptive_sparse.errors import fail

    if baselines is None:
        return {}
    try:
        out = {str(k): float(v) for k, v in dict(baselines).items()}
    except (TypeError, ValueError):
        out = None
    if out is None or any(not (math.isfinite(v) and v > 0) for v in out.values()):
        raise fail("baselines", "a mapping of name -> cost > 0 (ms of dense attention when "
                   "cost is latency_ms)", baselines)
    return out


def plot_frontier(rows: list[dict], out, *, cost: str = "density", budgets=(),
                  title: str = "sparsity / quality frontier", baselines=None,
                  note: str = "") -> Path:
    """Sweep trials (dicts with method, `cost`, ppl_change, front_method) as faint points and
    each method's Pareto front as a line, coloured by method (a method's threshold and top-p
    policies share its colour, with their own line styles: `method_style`); each quality budget
    a labelled dotted line. `baselines` ({"SDPA cuDNN": 102.47, ...}, in the units of `cost`,
    e.g. ms of dense attention when cost is latency_ms) are labelled grey vertical lines, in the
    legend with their value; `note` is a second, smaller title line (e.g. "Pareto fronts only")."""
    dense = _check_baselines(baselines)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.6))
    for method in sorted({r["method"] for r in rows}):
        pts = [r for r in rows if r["method"] == method]
        style = method_style(method)
        ax.scatter([r[cost] for r in pts], [100 * r["ppl_change"] for r in pts], s=10,
                   alpha=0.3, color=style["color"])
        front = sorted((r for r in pts if r.get("front_method")), key=lambda r: r[cost])
        ax.plot([r[cost] for r in front], [100 * r["ppl_change"] for r in front], ms=4,
                label=method, **style)
    unit = " ms" if cost == "latency_ms" else ""
    for i, (name, x) in enumerate(dense.items()):
        ax.axvline(x, color=METHOD_COLORS["dense"], lw=1.2,
                   linestyle=_BASELINE_STYLES[i % len(_BASELINE_STYLES)],
                   label=f"dense: {name} {x:.4g}{unit}")
        ax.annotate(name, xy=(x, 1.0), xycoords=("data", "axes fraction"), xytext=(-2, -4),
                    textcoords="offset points", rotation=90, ha="right", va="top",
                    fontsize=7, color=METHOD_COLORS["dense"])
    for b in budgets:
        ax.axhline(100 * b, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"budget +{100 * b:g}% ppl", xy=(1.0, 100 * b), xycoords=("axes fraction",
                    "data"), xytext=(-4, 2), textcoords="offset points", ha="right",
                    va="bottom", fontsize=7, color="grey")
    ax.set_yscale("symlog", linthresh=1.0)
    if rows:
        ax.set_ylim(bottom=min(0.0, 120 * min(r["ppl_change"] for r in rows)))
    ax.set_xlabel({"density": "density (share of causal blocks computed)",
                   "latency_ms": "latency (ms)"}.get(cost, cost))
    ax.set_ylabel("perplexity change vs dense (%)")
    ax.set_title(title + (f"\n{note}" if note else ""), **({"fontsize": 10} if note else {}))
    ax.grid(alpha=0.3)
    # long handles, so that line styles (threshold vs top-p policies) read in the legend
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
              handlelength=3.2)
    return _save(plt, fig, out)
