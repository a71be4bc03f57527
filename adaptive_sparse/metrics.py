"""torchmetrics `Metric`s for sparse attention: perplexity, attention recall, density, needle
accuracy. Each accumulates sums (so results over many sequences, and across processes with
torchmetrics' sync, are exact) and computes the ratio at the end."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from adaptive_sparse.masks import BlockSparseMask


def _as_tensor(name: str, x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu()
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return torch.tensor(float(x), dtype=torch.float64)
    raise TypeError(f"{name}: expected a number or a tensor, got {type(x).__name__}")


def _add_sums(metric: Metric, *names: str) -> None:
    """Scalar float64 states, summed across processes."""
    for name in names:
        metric.add_state(name, default=torch.tensor(0.0, dtype=torch.float64),
                         dist_reduce_fx="sum")


class Perplexity(Metric):
    """exp(total NLL / total tokens), from summed negative log-likelihoods (natural log).

    update(nll_sum, count): nll_sum a float or tensor (summed over `count` predicted tokens)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        _add_sums(self, "nll", "tokens")

    def update(self, nll_sum, count) -> None:
        nll, n = _as_tensor("nll_sum", nll_sum).sum(), _as_tensor("count", count).sum()
        if not torch.isfinite(nll):
            raise ValueError(f"nll_sum: expected a finite value, got {float(nll)}")
        if not torch.isfinite(n) or n < 0:
            raise ValueError(f"count: expected a non-negative token count, got {float(n)}")
        self.nll += nll.to(self.nll.device)
        self.tokens += n.to(self.tokens.device)

    def compute(self) -> torch.Tensor:
        if self.tokens <= 0:
            raise ValueError("Perplexity: no tokens were counted (call update first)")
        return torch.exp(self.nll / self.tokens)


class AttentionRecall(Metric):
    """Share of the true attention mass inside the selected tiles, averaged over query-block
    rows (and heads, batches and updates).

    update(block_sum [B, Hq, Qb, Kb], mask): block_sum from `block_attention_maps` (rows sum to 1
    over the causal region); mask a BlockSparseMask or bool [B|1, H, Qb, Kb] with H dividing Hq.
    num_heads: also keep per-head sums (`compute_per_head()`, float [num_heads])."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_heads: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if num_heads is not None and (isinstance(num_heads, bool) or not isinstance(num_heads, int)
                                      or num_heads < 1):
            raise ValueError(f"num_heads: expected a positive int or None, got {num_heads!r}")
        self.num_heads = num_heads
        _add_sums(self, "kept", "rows")
        if num_heads is not None:
            self.add_state("kept_per_head", default=torch.zeros(num_heads, dtype=torch.float64),
                           dist_reduce_fx="sum")

    def update(self, block_sum: torch.Tensor, mask) -> None:
        if not isinstance(block_sum, torch.Tensor) or block_sum.dim() != 4 \
                or not block_sum.dtype.is_floating_point:
            raise ValueError(f"block_sum: expected a float tensor [B, Hq, Qb, Kb], got "
                             f"{getattr(block_sum, 'shape', type(block_sum).__name__)}")
        dense = mask.to_dense() if isinstance(mask, BlockSparseMask) else mask
        if not isinstance(dense, torch.Tensor) or dense.dtype != torch.bool or dense.dim() != 4:
            raise ValueError("mask: expected a BlockSparseMask or a bool tensor [B, H, Qb, Kb]")
        B, Hq = block_sum.shape[:2]
        if dense.shape[2:] != block_sum.shape[2:]:
            raise ValueError(f"mask: expected tiles {tuple(block_sum.shape[2:])} (those of "
                             f"block_sum), got {tuple(dense.shape[2:])}")
        if dense.shape[0] not in (1, B) or Hq % dense.shape[1]:
            raise ValueError(f"mask: expected batch 1 or {B} and heads dividing {Hq}, got "
                             f"{tuple(dense.shape[:2])}")
        if self.num_heads is not None and Hq != self.num_heads:
            raise ValueError(f"block_sum: expected {self.num_heads} heads, got {Hq}")
        dense = dense.to(block_sum.device).repeat_interleave(Hq // dense.shape[1], dim=1)
        kept = (block_sum.double() * dense).sum(-1)  # [B, Hq, Qb]
        self.kept += kept.sum().to(self.kept.device)
        self.rows += float(kept.numel())
        if self.num_heads is not None:
            self.kept_per_head += kept.sum((0, 2)).to(self.kept_per_head.device)

    def compute(self) -> torch.Tensor:
        if self.rows <= 0:
            raise ValueError("AttentionRecall: nothing was recorded (call update first)")
        return self.kept / self.rows

    def compute_per_head(self) -> torch.Tensor:
        if self.num_heads is None:
            raise ValueError("num_heads: set it at construction to get per-head recall")
        if self.rows <= 0:
            raise ValueError("AttentionRecall: nothing was recorded (call update first)")
        return self.kept_per_head / (self.rows / self.num_heads)


class Density(Metric):
    """Selected tiles / tiles of the causal region, over all updates.

    update(mask): a BlockSparseMask (its heads and batch all count)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        _add_sums(self, "selected", "total")

    def update(self, mask: BlockSparseMask) -> None:
        if not isinstance(mask, BlockSparseMask):
            raise TypeError(f"mask: expected a BlockSparseMask, got {type(mask).__name__}")
        self.selected += float(mask.kv_num_blocks.sum(dtype=torch.int64))
        self.total += float(int(mask.allowed().sum()) * mask.batch * mask.heads)

    def compute(self) -> torch.Tensor:
        if self.total <= 0:
            raise ValueError("Density: nothing was recorded (call update first)")
        return self.selected / self.total


class NeedleAccuracy(Metric):
    """Share of needle answers whose first number equals the hidden value.

    update(answers: list[str], targets: list[str | NeedleSample])."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        _add_sums(self, "correct", "total")

    def update(self, answers, targets) -> None:
        from adaptive_sparse.data.needle import NeedleSample, score_answer

        if isinstance(answers, str) or isinstance(targets, str):
            raise TypeError("answers, targets: expected lists of strings, got a single string")
        answers, targets = list(answers), list(targets)
        if len(answers) != len(targets):
            raise ValueError(f"answers: expected {len(targets)} answers (one per target), "
                             f"got {len(answers)}")
        for a, t in zip(answers, targets):
            value = t.answer if isinstance(t, NeedleSample) else str(t)
            self.correct += float(score_answer(a, value))
            self.total += 1.0

    def compute(self) -> torch.Tensor:
        if self.total <= 0:
            raise ValueError("NeedleAccuracy: nothing was recorded (call update first)")
        return self.correct / self.total
