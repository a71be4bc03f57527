"""The one mask type every part of adaptive-sparse speaks.

`BlockSparseMask` stores FlexAttention's block layout: for each (batch, head, query block) the
number of key blocks read and their indices, ascending. Blocks are square (`block_size` rows of
queries by `block_size` keys). Causal masks align queries to the end of the keys: query row `i`
sits at absolute position `i + (kv_len - q_len)` and sees keys `j <= i + (kv_len - q_len)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from adaptive_sparse.errors import fail

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)


def num_blocks(length: int, block_size: int) -> int:
    return (length + block_size - 1) // block_size


def block_causal(q_len: int, kv_len: int, block_size: int, *, causal: bool = True,
                 device=None) -> torch.Tensor:
    """Blocks that hold at least one visible (query, key) pair. bool [Qb, Kb]."""
    qb, kb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    if not causal:
        return torch.ones(qb, kb, dtype=torch.bool, device=device)
    offset = kv_len - q_len
    last_row = torch.clamp((torch.arange(qb, device=device) + 1) * block_size, max=q_len) - 1
    first_key = torch.arange(kb, device=device) * block_size
    return first_key[None, :] <= (last_row + offset)[:, None]


def diagonal_blocks(q_len: int, kv_len: int, block_size: int, *, device=None) -> torch.Tensor:
    """Key blocks crossed by the causal diagonal of each query block. bool [Qb, Kb].

    Keeping them guarantees every query row sees at least its own key."""
    qb, kb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    offset = kv_len - q_len
    rows = torch.arange(qb, device=device)
    first = (rows * block_size + offset) // block_size
    last = (torch.clamp((rows + 1) * block_size, max=q_len) - 1 + offset) // block_size
    cols = torch.arange(kb, device=device)
    return (cols[None, :] >= first[:, None]) & (cols[None, :] <= last[:, None])


def _check_values(name: str, t: torch.Tensor, hi: int, expected: str) -> None:
    """Values of `t` in [0, hi], else `fail` with the first bound crossed (min or max)."""
    if t.numel():
        low, high = int(t.min()), int(t.max())
        if low < 0 or high > hi:
            raise fail(name, expected, low if low < 0 else high)


def _indices_of(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, H, Qb, Kb] -> (kv_num_blocks int32 [B, H, Qb], kv_indices int32 [B, H, Qb, Kb]):
    per row the selected blocks first (ascending), then the others (ascending)."""
    kb = dense.shape[-1]
    num = dense.sum(-1, dtype=torch.int32)
    key = (~dense).to(torch.int64) * kb + torch.arange(kb, device=dense.device)
    return num, torch.argsort(key, dim=-1).to(torch.int32).contiguous()


def visible_blocks(q_len: int, kv_len: int, block_size: int, *, causal: bool = True,
                   device=None) -> torch.Tensor:
    """Tiles every (query, key) pair of which is visible: inside both lengths and, if causal,
    on or below the end-aligned diagonal. bool [Qb, Kb] (a subset of `block_causal`)."""
    qb, kb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    first_row = torch.arange(qb, device=device) * block_size
    last_key = (torch.arange(kb, device=device) + 1) * block_size - 1
    whole = ((first_row + block_size <= q_len)[:, None]) & (last_key < kv_len)[None, :]
    if causal:
        whole &= last_key[None, :] <= (first_row + kv_len - q_len)[:, None]
    return whole


def _check_hint(value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value < 0):
        raise fail("blocks_per_row", "None or a non-negative finite float", value)


@dataclass(frozen=True, eq=False)
class BlockSparseMask:
    """Block-sparse attention mask in FlexAttention's layout.

    kv_num_blocks: int32 [B, H, Qb]      key blocks read by each query block
    kv_indices:    int32 [B, H, Qb, Kb]  their indices; the first `kv_num_blocks` entries are
                                         strictly ascending, the rest is padding in [0, Kb)
    block_size, q_len, kv_len, causal    geometry; Qb = ceil(q_len / bs), Kb = ceil(kv_len / bs)
    blocks_per_row                       optional hint: the mean of kv_num_blocks, known on the
                                         host (e.g. a top-k policy). Kernels pick their tuning by
                                         it without reading the device; it never changes a
                                         result. None: computed when needed.

    `H` is 1 (broadcast over all heads), the number of KV heads (one mask per GQA group), or the
    number of query heads. `B` is 1 (broadcast) or the batch size.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_size: int
    q_len: int
    kv_len: int
    causal: bool = True
    blocks_per_row: float | None = field(default=None, compare=False)

    def __post_init__(self):
        self._validate()

    @classmethod
    def _trusted(cls, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, block_size: int,
                 q_len: int, kv_len: int, causal: bool = True,
                 blocks_per_row: float | None = None) -> "BlockSparseMask":
        """A mask built without `_validate`: for internal callers whose tensors are valid by
        construction (no device sync, no extra launch). Users construct masks normally."""
        obj = object.__new__(cls)
        for name, val in (("kv_num_blocks", kv_num_blocks), ("kv_indices", kv_indices),
                          ("block_size", block_size), ("q_len", q_len), ("kv_len", kv_len),
                          ("causal", causal), ("blocks_per_row", blocks_per_row)):
            object.__setattr__(obj, name, val)
        return obj

    def with_blocks_per_row(self, value: float | None) -> "BlockSparseMask":
        """The same mask carrying the autotune hint `value` (mean key blocks per row)."""
        _check_hint(value)
        return BlockSparseMask._trusted(self.kv_num_blocks, self.kv_indices, self.block_size,
                                        self.q_len, self.kv_len, self.causal,
                                        None if value is None else float(value))

    def _validate(self) -> None:
        bs, q_len, kv_len = self.block_size, self.q_len, self.kv_len
        if isinstance(bs, bool) or not isinstance(bs, int) or bs not in SUPPORTED_BLOCK_SIZES:
            raise fail("block_size", f"one of {SUPPORTED_BLOCK_SIZES}", bs)
        for name, val in (("q_len", q_len), ("kv_len", kv_len)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise fail(name, "a positive int", val)
        if not isinstance(self.causal, bool):
            raise fail("causal", "a bool", self.causal)
        _check_hint(self.blocks_per_row)
        if self.causal and q_len > kv_len:
            raise fail("q_len", f"<= kv_len ({kv_len}) for a causal mask", q_len)
        n, idx = self.kv_num_blocks, self.kv_indices
        if not isinstance(n, torch.Tensor):
            raise fail("kv_num_blocks", "a torch.Tensor", type(n).__name__)
        if not isinstance(idx, torch.Tensor):
            raise fail("kv_indices", "a torch.Tensor", type(idx).__name__)
        if n.dtype != torch.int32:
            raise fail("kv_num_blocks", "dtype torch.int32", n.dtype)
        if idx.dtype != torch.int32:
            raise fail("kv_indices", "dtype torch.int32", idx.dtype)
        if n.device != idx.device:
            raise fail("kv_indices", f"device {n.device} (that of kv_num_blocks)", idx.device)
        qb, kb = num_blocks(q_len, bs), num_blocks(kv_len, bs)
        if n.dim() != 3:
            raise fail("kv_num_blocks", "rank 3 [B, H, Qb]", tuple(n.shape))
        if n.shape[2] != qb:
            raise fail("kv_num_blocks", f"Qb = ceil(q_len / block_size) = {qb} in dim 2",
                       tuple(n.shape))
        if idx.dim() != 4:
            raise fail("kv_indices", "rank 4 [B, H, Qb, Kb]", tuple(idx.shape))
        if tuple(idx.shape) != (n.shape[0], n.shape[1], qb, kb):
            raise fail("kv_indices", f"shape {(n.shape[0], n.shape[1], qb, kb)} "
                       f"(Kb = ceil(kv_len / block_size))", tuple(idx.shape))
        if n.shape[0] < 1 or n.shape[1] < 1:
            raise fail("kv_num_blocks", "B >= 1 and H >= 1", tuple(n.shape))
        _check_values("kv_num_blocks", n, kb, f"values in [0, {kb}]")
        _check_values("kv_indices", idx, kb - 1, f"values in [0, {kb})")
        valid = self._valid_slots()
        if kb > 1:
            step = idx[..., 1:] - idx[..., :-1]
            both = valid[..., 1:]
            bad = ((step <= 0) & both).any(-1)  # [B, H, Qb]
            if bool(bad.any()):
                raise fail("kv_indices", "strictly ascending indices (no duplicates) in the "
                           "first kv_num_blocks entries of each row", self._first_row(bad))
        if self.causal:
            allowed = block_causal(q_len, kv_len, bs, device=idx.device)  # [Qb, Kb]
            ok = torch.gather(allowed.expand(*idx.shape[:2], qb, kb), 3, idx.long())
            bad = (valid & ~ok).any(-1)  # [B, H, Qb]
            if bool(bad.any()):
                raise fail("kv_indices", "only blocks inside the causal region (a key block "
                           "after every query of its query block)", self._first_row(bad))

    def _first_row(self, bad: torch.Tensor) -> dict:
        """The first row flagged in `bad` (bool [B, H, Qb]) and its selected key blocks."""
        b, h, r = (int(i) for i in bad.nonzero()[0])
        n = int(self.kv_num_blocks[b, h, r])
        return {"row": (b, h, r), "blocks": self.kv_indices[b, h, r, :n].tolist()}

    def _valid_slots(self) -> torch.Tensor:
        kb = self.kv_indices.shape[-1]
        ar = torch.arange(kb, device=self.kv_indices.device)
        return ar < self.kv_num_blocks[..., None]  # [B, H, Qb, Kb]

    @classmethod
    def from_dense(cls, dense: torch.Tensor, *, block_size: int, q_len: int, kv_len: int,
                   causal: bool = True, validate: bool = True) -> "BlockSparseMask":
        """dense: bool [B, H, Qb, Kb], True where a tile is computed.

        validate=False skips the value checks of the result (which sync with the device): only
        for callers whose `dense` is inside the causal region and of the right shape by
        construction, e.g. `Policy.to_mask` on a hot path."""
        if not isinstance(dense, torch.Tensor):
            raise fail("dense", "a bool torch.Tensor [B, H, Qb, Kb]", type(dense).__name__)
        if dense.dtype != torch.bool:
            raise fail("dense", "dtype torch.bool", dense.dtype)
        if dense.dim() != 4:
            raise fail("dense", "rank 4 [B, H, Qb, Kb]", tuple(dense.shape))
        num, idx = _indices_of(dense)
        if not validate:
            return cls._trusted(num, idx.contiguous(), block_size, q_len, kv_len, causal)
        return cls(num, idx.contiguous(), block_size, q_len, kv_len, causal)

    @classmethod
    def from_indices(cls, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, *,
                     block_size: int, q_len: int, kv_len: int, causal: bool = True,
                     sort: bool = True) -> "BlockSparseMask":
        """Build from FlexAttention-style indices of any integer dtype: kv_num_blocks [B, H, Qb]
        in [0, Kb], kv_indices [B, H, Qb, Kb] in [0, Kb). Values are checked in the input dtype
        before the cast to int32. With `sort`, the first kv_num_blocks entries of each row may
        come in any order and are sorted; duplicates are still refused."""
        for name, t, rank in (("kv_num_blocks", kv_num_blocks, 3), ("kv_indices", kv_indices, 4)):
            if not isinstance(t, torch.Tensor):
                raise fail(name, "a torch.Tensor", type(t).__name__)
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise fail(name, "an integer dtype", t.dtype)
            if t.dim() != rank:
                raise fail(name, f"rank {rank}", tuple(t.shape))
        if not isinstance(block_size, int) or isinstance(block_size, bool) \
                or block_size not in SUPPORTED_BLOCK_SIZES:
            raise fail("block_size", f"one of {SUPPORTED_BLOCK_SIZES}", block_size)
        if isinstance(kv_len, bool) or not isinstance(kv_len, int) or kv_len < 1:
            raise fail("kv_len", "a positive int", kv_len)
        kb = num_blocks(kv_len, block_size)
        for name, t, hi in (("kv_num_blocks", kv_num_blocks, kb),
                            ("kv_indices", kv_indices, kb - 1)):
            _check_values(name, t, hi, f"values in [0, {hi}]")
        kv_num_blocks = kv_num_blocks.to(torch.int32)
        if sort and kv_indices.shape[:3] == kv_num_blocks.shape \
                and kv_indices.device == kv_num_blocks.device:
            valid = torch.arange(kv_indices.shape[-1], device=kv_indices.device) \
                < kv_num_blocks[..., None]
            keyed = torch.where(valid, kv_indices.long(), kb + kv_indices.long())
            kv_indices = torch.sort(keyed, dim=-1).values
            kv_indices = torch.where(kv_indices >= kb, kv_indices - kb, kv_indices)
        return cls(kv_num_blocks, kv_indices.to(torch.int32).contiguous(), block_size, q_len,
                   kv_len, causal)

    @classmethod
    def full(cls, batch: int, heads: int, *, block_size: int, q_len: int, kv_len: int,
             causal: bool = True, device=None) -> "BlockSparseMask":
        """Every block of the (causal) region."""
        allowed = block_causal(q_len, kv_len, block_size, causal=causal, device=device)
        mask = cls.from_dense(allowed.expand(batch, heads, *allowed.shape).contiguous(),
                              block_size=block_size, q_len=q_len, kv_len=kv_len, causal=causal)
        per_row = block_causal(q_len, kv_len, block_size, causal=causal).sum() / allowed.shape[0]
        return mask.with_blocks_per_row(float(per_row))

    @property
    def batch(self) -> int:
        return self.kv_num_blocks.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return num_blocks(self.q_len, self.block_size)

    @property
    def num_kv_blocks(self) -> int:
        return num_blocks(self.kv_len, self.block_size)

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def allowed(self) -> torch.Tensor:
        """bool [Qb, Kb]: the causal block region (everything when not causal)."""
        return block_causal(self.q_len, self.kv_len, self.block_size, causal=self.causal,
                            device=self.device)

    def to_dense(self) -> torch.Tensor:
        """bool [B, H, Qb, Kb]."""
        valid = self._valid_slots()
        dense = torch.zeros(self.kv_indices.shape, dtype=torch.bool, device=self.device)
        dense.scatter_(3, self.kv_indices.long(), valid)
        return dense

    def to(self, device) -> "BlockSparseMask":
        return BlockSparseMask._trusted(self.kv_num_blocks.to(device), self.kv_indices.to(device),
                                        self.block_size, self.q_len, self.kv_len, self.causal,
                                        self.blocks_per_row)

    def to_flex(self):
        """FlexAttention `BlockMask` built from the kv indices (never from an N x N mask).

        A kept tile that is wholly visible (`visible_blocks`) is a full block, on which Flex
        skips the mask_mod; only tiles cut by the causal diagonal or a ragged edge (q_len or
        kv_len not a multiple of block_size) are partial. The mask_mod looks the element's
        block up in the [B, H, Qb, Kb] table and applies the end-aligned causal rule, so the
        BlockMask is exact also where Flex evaluates mask_mod alone (its eager CPU path).
        """
        from torch.nn.attention.flex_attention import BlockMask

        offset = self.kv_len - self.q_len
        table = self.to_dense()  # [B, H, Qb, Kb]
        whole = visible_blocks(self.q_len, self.kv_len, self.block_size, causal=self.causal,
                               device=self.device)
        num, idx = _indices_of(table & ~whole)
        full_num, full_idx = _indices_of(table & whole)
        bs, causal = self.block_size, self.causal
        one_b, one_h = self.batch == 1, self.heads == 1

        def mask_mod(b, h, q_idx, kv_idx):
            keep = table[0 if one_b else b, 0 if one_h else h, q_idx // bs, kv_idx // bs]
            if causal:
                keep = keep & (kv_idx <= q_idx + offset)
            return keep

        return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=bs,
                                        mask_mod=mask_mod, seq_lengths=(self.q_len, self.kv_len))

    @classmethod
    def from_flex(cls, block_mask, *, causal: bool = True) -> "BlockSparseMask":
        """Back from a FlexAttention `BlockMask` (partial and full blocks are merged)."""
        q_len, kv_len = block_mask.seq_lengths
        bs_q, bs_k = block_mask.BLOCK_SIZE
        if bs_q != bs_k:
            raise fail("block_mask", "square blocks", block_mask.BLOCK_SIZE)
        qb, kb = num_blocks(q_len, bs_q), num_blocks(kv_len, bs_q)

        def dense_of(num, idx):
            num, idx = num[..., :qb], idx[..., :qb, :kb]
            ar = torch.arange(idx.shape[-1], device=idx.device)
            out = torch.zeros(*idx.shape[:3], kb, dtype=torch.bool, device=idx.device)
            out.scatter_(3, idx.long(), ar < num[..., None])
            return out

        dense = dense_of(block_mask.kv_num_blocks, block_mask.kv_indices)
        if block_mask.full_kv_num_blocks is not None:
            dense |= dense_of(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
        return cls.from_dense(dense, block_size=bs_q, q_len=q_len, kv_len=kv_len, causal=causal)

    def to_bsr(self, batch: int = 0, head: int = 0):
        """scipy BSR for one (batch, head): shape [Qb*bs, Kb*bs], blocks (bs, bs) of ones.

        `indptr` and `indices` are the layout FlashInfer-style planners take (with R = C =
        block_size and M = q_len, N = kv_len; the matrix shape is padded to whole blocks)."""
        import numpy as np
        import scipy.sparse as sp

        indptr, indices = self.bsr_layout(batch, head)
        bs = self.block_size
        data = np.ones((len(indices), bs, bs), dtype=np.bool_)
        return sp.bsr_array((data, indices, indptr),
                            shape=(self.num_q_blocks * bs, self.num_kv_blocks * bs))

    def bsr_layout(self, batch: int = 0, head: int = 0):
        """(indptr int32 [Qb+1], indices int32 [nnz]) of one (batch, head) as numpy arrays."""
        import numpy as np

        if not (0 <= batch < self.batch) or not (0 <= head < self.heads):
            raise fail("batch/head", f"indices in [0, {self.batch}) x [0, {self.heads})",
                        (batch, head))
        num = self.kv_num_blocks[batch, head].cpu().numpy().astype(np.int64)
        idx = self.kv_indices[batch, head].cpu().numpy()
        indptr = np.zeros(len(num) + 1, dtype=np.int32)
        indptr[1:] = np.cumsum(num)
        indices = np.concatenate([idx[r, :num[r]] for r in range(len(num))]) if len(num) \
            else np.zeros(0, np.int32)
        return indptr, indices.astype(np.int32)

    @classmethod
    def from_bsr(cls, matrices, *, block_size: int, q_len: int, kv_len: int,
                 causal: bool = True) -> "BlockSparseMask":
        """From a nested list [B][H] of scipy BSR arrays (as produced by `to_bsr`)."""
        qb, kb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
        dense = torch.zeros(len(matrices), len(matrices[0]), qb, kb, dtype=torch.bool)
        for b, row in enumerate(matrices):
            for h, m in enumerate(row):
                if tuple(m.blocksize) != (block_size, block_size):
                    raise fail("matrices", f"blocksize {(block_size, block_size)}", m.blocksize)
                for r in range(qb):
                    cols = m.indices[m.indptr[r]:m.indptr[r + 1]]
                    dense[b, h, r, torch.as_tensor(cols, dtype=torch.long)] = True
        return cls.from_dense(dense, block_size=block_size, q_len=q_len, kv_len=kv_len,
                              causal=causal)

    def expand_heads(self, num_heads: int) -> "BlockSparseMask":
        """One mask per query head. H = 1 broadcasts; H = Hkv repeats each group's mask."""
        h = self.heads
        if num_heads == h:
            return self
        if num_heads % h:
            raise fail("num_heads", f"a multiple of the mask's head count {h}", num_heads)
        rep = num_heads // h
        return BlockSparseMask._trusted(self.kv_num_blocks.repeat_interleave(rep, dim=1),
                                        self.kv_indices.repeat_interleave(rep, dim=1),
                                        self.block_size, self.q_len, self.kv_len, self.causal,
                                        self.blocks_per_row)

    def group_union(self, group_size: int) -> "BlockSparseMask":
        """Per-query-head mask -> per-KV-group mask: a group reads the union of its heads."""
        h = self.heads
        if group_size < 1 or h % group_size:
            raise fail("group_size", f"a divisor of the mask's head count {h}", group_size)
        dense = self.to_dense()
        dense = dense.view(self.batch, h // group_size, group_size, *dense.shape[2:]).any(2)
        return BlockSparseMask.from_dense(dense, block_size=self.block_size, q_len=self.q_len,
                                          kv_len=self.kv_len, causal=self.causal, validate=False)

    def density(self) -> float:
        """Selected blocks / blocks in the causal region (all blocks when not causal)."""
        total = int(self.allowed().sum()) * self.batch * self.heads
        return float(self.kv_num_blocks.sum(dtype=torch.int64)) / max(total, 1)

    def density_per_head(self) -> torch.Tensor:
        """float [H]: density of each head, averaged over the batch."""
        total = int(self.allowed().sum()) * self.batch
        return self.kv_num_blocks.sum((0, 2), dtype=torch.int64).double() / max(total, 1)

    def __repr__(self) -> str:
        return (f"BlockSparseMask(B={self.batch}, H={self.heads}, Qb={self.num_q_blocks}, "
                f"Kb={self.num_kv_blocks}, block_size={self.block_size}, q_len={self.q_len}, "
                f"kv_len={self.kv_len}, causal={self.causal}, density={self.density():.3f})")

    def __eq__(self, other) -> bool:
        if not isinstance(other, BlockSparseMask):
            return NotImplemented
        return ((self.block_size, self.q_len, self.kv_len, self.causal)
                == (other.block_size, other.q_len, other.kv_len, other.causal)
                and self.kv_num_blocks.shape == other.kv_num_blocks.shape
                and bool(torch.equal(self.to_dense().cpu(), other.to_dense().cpu())))

    __hash__ = None


def combine(*masks: BlockSparseMask, op: str = "or") -> BlockSparseMask:
    """Union ("or") or intersection ("and") of masks of the same geometry."""
    if not masks:
        raise fail("masks", "at least one mask", 0)
    first = masks[0]
    dense = first.to_dense()
    for m in masks[1:]:
        if (m.block_size, m.q_len, m.kv_len, m.causal) != \
                (first.block_size, first.q_len, first.kv_len, first.causal):
            raise fail("masks", "the same block_size, q_len, kv_len and causal", m)
        other = m.to_dense()
        if op == "or":
            dense = dense | other
        elif op == "and":
            dense = dense & other
        else:
            raise fail("op", "'or' or 'and'", op)
    return BlockSparseMask.from_dense(dense, block_size=first.block_size, q_len=first.q_len,
                                      kv_len=first.kv_len, causal=first.causal, validate=False)


def blocks_per_row_for_density(density: float, q_len: int, kv_len: int, block_size: int) -> int:
    """The uniform per-row block budget whose density is closest to `density`."""
    allowed = block_causal(q_len, kv_len, block_size)
    per_row = allowed.sum(1)
    best, best_err = 1, math.inf
    for k in range(1, int(per_row.max()) + 1):
        d = float(torch.clamp(per_row, max=k).sum()) / float(per_row.sum())
        if abs(d - density) < best_err:
            best, best_err = k, abs(d - density)
    return best


def compare_masks(masks, ref) -> dict:
    """How two {key (e.g. layer): BlockSparseMask} dicts differ, pooled over their keys: exact
    (same index tables everywhere), tiles_differ, rows_differ (query-block rows with a differing
    tile), tiles (tiles compared), tile_fraction (tiles_differ / tiles)."""
    if set(masks) != set(ref):
        raise fail("ref", f"the keys of masks {sorted(masks)}", sorted(ref))
    tiles = rows = total = 0
    exact = True
    for key, m in masks.items():
        r = ref[key]
        if (m.block_size, m.q_len, m.kv_len) != (r.block_size, r.q_len, r.kv_len):
            raise fail(f"ref[{key!r}]", "the block_size, q_len and kv_len of masks[key]", r)
        exact &= torch.equal(m.kv_num_blocks, r.kv_num_blocks) \
            and torch.equal(m.kv_indices, r.kv_indices)
        diff = m.to_dense() != r.to_dense()  # [B, H, Qb, Kb] (batch 1 or heads 1 broadcast)
        tiles += int(diff.sum())
        rows += int(diff.any(-1).sum())
        total += diff.numel()
    return dict(exact=bool(exact), tiles_differ=tiles, rows_differ=rows, tiles=total,
                tile_fraction=tiles / max(total, 1))
