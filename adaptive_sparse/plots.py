"""PNG figures (matplotlib, Agg backend): the true block attention beside a method's mask, and
perplexity change against density for a set of settings."""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def _save(plt, fig, out) -> Path:
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tradeoff(results: list[dict], out, *, title: str = "") -> Path:
    """Scatter of perplexity change (%) against density, one labelled point per result
    (dicts with keys name, density, ppl_change)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in results:
        if r.get("density") is None:
            continue
        x, y = r["density"], 100 * r["ppl_change"]
        ax.scatter([x], [y], s=30)
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("density (share of causal blocks computed)")
    ax.set_ylabel("perplexity change vs dense (%)")
    if title:
        ax.set_title(title)
    return _save(plt, fig, out)
