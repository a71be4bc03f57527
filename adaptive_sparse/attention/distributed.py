"""Context-parallel (ring) block-sparse attention over torch.distributed.

A sequence of N tokens is cut into 2P chunks of C tokens (C a multiple of the block size; the
sequence is padded at its end to 2P * C). With layout "zigzag" rank r holds chunks r and
2P-1-r, which balances causal work; with "contiguous" it holds chunks 2r and 2r+1. A rank's
queries, keys and values are its two chunks concatenated: q_local [B, Hq, L, D], L = 2C.

The schedule comes from the block mask. For every other rank, a rank knows which key blocks of
that rank its query blocks read, per batch and KV head (from the global mask it holds, or from
one all_gather of a small bool matrix when each rank holds only its own rows). Those K/V tiles,
and only those, travel directly from owner to consumer by P2P (`dist.batch_isend_irecv`) in P-1
rounds (round t: send to r+t, receive from r-t, the order of a ring); a pair that needs nothing
posts nothing. While the transfers run, the rank computes its own chunks (causal); then the
tiles of each round, with the mask's columns remapped to the packed tiles, and merges the partial
outputs by log-sum-exp. Distinct chunks are whole blocks apart, so the tiles of other ranks are
either fully visible or not needed at all: only the rank's own step applies the causal rule.

Limits: self-attention prefill (mask q_len == kv_len == N); a non-causal mask needs N to be a
multiple of 2P * block_size (padded keys would be visible); padded query rows of the output are
unspecified and dropped by `unshard_sequence`.

    sh = dict(rank=dist.get_rank(), world=dist.get_world_size(), block_size=mask.block_size)
    q_l, k_l, v_l = (shard_sequence(t, dim=2, **sh) for t in (q, k, v))
    out_l, stats = context_parallel_attention(q_l, k_l, v_l, mask, return_stats=True)
    out = gather_sequence(out_l, dim=2, seq_len=mask.q_len)  # == block_sparse_attention(...)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from adaptive_sparse.attention.api import block_sparse_attention, check_head_tensor
from adaptive_sparse.errors import fail
from adaptive_sparse.masks import SUPPORTED_BLOCK_SIZES, BlockSparseMask, num_blocks

LAYOUTS = ("zigzag", "contiguous")


def _check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise fail("layout", f"one of {LAYOUTS}", layout)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise fail(name, f"an int >= {low}", value)


def chunk_ids(rank: int, world: int, layout: str = "zigzag") -> tuple[int, int]:
    """The two chunks (of 2 * world) that `rank` holds, in the order they are concatenated."""
    _check_layout(layout)
    return (rank, 2 * world - 1 - rank) if layout == "zigzag" else (2 * rank, 2 * rank + 1)


def padded_length(seq_len: int, world: int, block_size: int) -> int:
    """seq_len rounded up to a multiple of 2 * world * block_size (whole blocks per chunk)."""
    _check_int("seq_len", seq_len, 1)
    _check_int("world", world, 1)
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise fail("block_size", f"one of {SUPPORTED_BLOCK_SIZES}", block_size)
    unit = 2 * world * block_size
    return -(-seq_len // unit) * unit


def local_positions(seq_len: int, rank: int, world: int, block_size: int,
                    layout: str = "zigzag", *, device=None) -> torch.Tensor:
    """int64 [L]: the global positions of `rank`'s rows (padding rows continue past seq_len)."""
    c = padded_length(seq_len, world, block_size) // (2 * world)
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device)
                      for i in chunk_ids(rank, world, layout)])


def shard_sequence(x: torch.Tensor, *, dim: int, rank: int, world: int, block_size: int,
                   layout: str = "zigzag") -> torch.Tensor:
    """`rank`'s shard of a full sequence: x padded with zeros along `dim` to the padded length,
    then its two chunks concatenated. [..., N, ...] -> [..., L, ...], L = padded / world."""
    n = x.shape[dim]
    total = padded_length(n, world, block_size)
    c = total // (2 * world)
    if total != n:
        shape = list(x.shape)
        shape[dim] = total - n
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    return torch.cat([x.narrow(dim, i * c, c) for i in chunk_ids(rank, world, layout)], dim=dim)


def unshard_sequence(shards, *, dim: int, seq_len: int, layout: str = "zigzag") -> torch.Tensor:
    """Inverse of `shard_sequence`: the shards of ranks 0..P-1 (any unit: tokens or blocks) ->
    the full sequence along `dim`, cut to its first `seq_len` entries."""
    world = len(shards)
    c = shards[0].shape[dim] // 2
    chunks = [None] * (2 * world)
    for r, s in enumerate(shards):
        first, second = chunk_ids(r, world, layout)
        chunks[first], chunks[second] = s.narrow(dim, 0, c), s.narrow(dim, c, c)
    return torch.cat(chunks, dim=dim).narrow(dim, 0, seq_len)


def _world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallel attention: torch.distributed is not initialized "
                           "(call dist.init_process_group first)")
    return dist.get_rank(group), dist.get_world_size(group)


def gather_sequence(x_local: torch.Tensor, *, dim: int, seq_len: int, group=None,
                    layout: str = "zigzag") -> torch.Tensor:
    """all_gather every rank's shard and reassemble the full sequence (cut to seq_len)."""
    _, world = _world(group)
    x_local = x_local.contiguous()
    parts = [torch.empty_like(x_local) for _ in range(world)]
    dist.all_gather(parts, x_local, group=group)
    return unshard_sequence(parts, dim=dim, seq_len=seq_len, layout=layout)


@dataclass(frozen=True)
class LocalMask:
    """The rows of a causal block mask that one rank's queries own.

    rows: bool [Bm, Hm, Lb, Kb]: Lb = L / block_size query blocks (the rank's chunks in order),
    Kb = ceil(seq_len / block_size) key blocks in global order. Bm in (1, B), Hm in (1, Hkv, Hq).
    """

    rows: torch.Tensor
    seq_len: int
    block_size: int


def local_mask(mask: BlockSparseMask, *, rank: int, world: int,
               layout: str = "zigzag") -> LocalMask:
    """`rank`'s rows of a global self-attention mask."""
    dense = _padded_dense(mask, world)
    bs = mask.block_size
    lb = padded_length(mask.q_len, world, bs) // (world * bs)
    rows = dense[:, :, _block_ids(rank, world, lb, layout, dense.device)]
    return LocalMask(rows[..., :mask.num_kv_blocks], mask.q_len, bs)


def _block_ids(rank: int, world: int, lb: int, layout: str, device) -> torch.Tensor:
    """int64 [Lb]: global block indices of `rank`'s blocks, in its order."""
    cb = lb // 2
    return torch.cat([torch.arange(i * cb, (i + 1) * cb, device=device)
                      for i in chunk_ids(rank, world, layout)])


def _padded_dense(mask: BlockSparseMask, world: int) -> torch.Tensor:
    """bool [Bm, Hm, Tb, Tb]: the mask's tiles on the padded block grid."""
    tb = padded_length(mask.q_len, world, mask.block_size) // mask.block_size
    dense = mask.to_dense()
    return F.pad(dense, (0, tb - dense.shape[-1], 0, tb - dense.shape[-2]))


@dataclass
class CPStats:
    """What one rank moved and computed in one context-parallel call (bytes of K and V)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    dense_ring_bytes: int = 0   # what a dense ring delivers to this rank: (P-1) K/V shards
    metadata_bytes: int = 0     # need matrices and headers exchanged by all_gather
    tiles_sent: int = 0         # (batch, KV head, key block) tiles
    tiles_received: int = 0
    peers_sent: int = 0
    peers_received: int = 0
    computed_blocks: int = 0    # (batch, mask head, query block, key block) tiles attended

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Recv:
    round: int
    peer: int
    tiles: int
    n_max: int
    slots: torch.Tensor | None  # int64 [tiles]: slots in [B * Hkv * n_max]; None = all, in order
    mask: BlockSparseMask       # local query blocks x packed key tiles, causal=False


@dataclass
class CPPlan:
    """The schedule of one context-parallel call on one rank (build with `plan_context_parallel`;
    reusable for every call with the same mask, shapes and group)."""

    rank: int
    world: int
    layout: str
    seq_len: int
    block_size: int
    shape: tuple  # (B, Hq, Hkv, L)
    self_mask: BlockSparseMask | None
    sends: list = field(default_factory=list)  # (round, peer, int64 flat tile indices)
    recvs: list = field(default_factory=list)  # _Recv
    stats: CPStats = field(default_factory=CPStats)


def _heads_to_kv(dense: torch.Tensor, hq: int, hkv: int) -> torch.Tensor:
    """[Bm, Hm, ...] -> [Bm, Hn, ...]: a per-query-head mask reduced to its KV groups (any)."""
    if dense.shape[1] == hq and hq != hkv:
        return dense.view(dense.shape[0], hkv, hq // hkv, *dense.shape[2:]).any(2)
    return dense


def _head_map(hm: int, hq: int, hkv: int, device) -> torch.Tensor:
    """int64 [Hm]: the need-matrix head that each mask head reads."""
    if hm == hq and hq != hkv:
        return torch.arange(hq, device=device) // (hq // hkv)
    return torch.arange(hm, device=device)


def _global_peer(group, peer: int) -> int:
    return peer if group is None or group is dist.group.WORLD else dist.get_global_rank(group, peer)


def _all_gather_small(t: torch.Tensor, world: int, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def plan_context_parallel(mask, *, batch: int, q_heads: int, kv_heads: int, head_dim: int,
                          elem_bytes: int = 2, group=None, layout: str = "zigzag",
                          seq_len: int | None = None, block_size: int | None = None,
                          device=None) -> CPPlan:
    """The P2P schedule and remapped masks of this rank.

    mask: a global `BlockSparseMask` (q_len == kv_len == N, the same on every rank; no
        communication), a `LocalMask` (this rank's rows only; the needs are exchanged by one
        all_gather), or None (dense causal; needs seq_len and block_size).
    batch, q_heads, kv_heads, head_dim, elem_bytes: the shapes of q_local / k_local (bytes are
        counted for K and V of this dtype size).
    """
    _check_layout(layout)
    rank, world = _world(group)
    for name, val in (("batch", batch), ("q_heads", q_heads), ("kv_heads", kv_heads),
                      ("head_dim", head_dim), ("elem_bytes", elem_bytes)):
        _check_int(name, val, 1)
    if q_heads % kv_heads:
        raise fail("kv_heads", f"a divisor of q_heads={q_heads}", kv_heads)
    stats = CPStats()
    if mask is None:
        if seq_len is None or block_size is None:
            raise fail("seq_len/block_size", "ints when mask is None (dense causal)",
                       (seq_len, block_size))
        mask = BlockSparseMask.full(1, 1, block_size=block_size, q_len=seq_len, kv_len=seq_len,
                                    device=device)
    if isinstance(mask, BlockSparseMask):
        if mask.q_len != mask.kv_len:
            raise fail("mask", "a self-attention mask: (q_len, kv_len) with q_len == kv_len",
                       (mask.q_len, mask.kv_len))
        causal, bs, n = mask.causal, mask.block_size, mask.q_len
        full = _padded_dense(mask, world)  # [Bm, Hm, Tb, Tb]
        tb = full.shape[-1]
        lb = tb // world
        order = torch.cat([_block_ids(r, world, lb, layout, full.device) for r in range(world)])
        full = full[:, :, order][..., order]  # rank-major blocks
        rows = full[:, :, rank * lb:(rank + 1) * lb]  # [Bm, Hm, Lb, Tb] rank-major columns
        bm, hm = full.shape[:2]
        need = full.view(bm, hm, world, lb, world, lb).any(3)  # [Bm, Hm, Pdst, Psrc, Lb]
        need = _heads_to_kv(need, q_heads, kv_heads).permute(2, 3, 0, 1, 4)
    elif isinstance(mask, LocalMask):
        causal, bs, n = True, mask.block_size, mask.seq_len
        r = mask.rows
        if not isinstance(r, torch.Tensor) or r.dtype != torch.bool or r.dim() != 4:
            raise fail("mask.rows", "a bool tensor [Bm, Hm, Lb, Kb]",
                       (r.dtype, tuple(r.shape)) if isinstance(r, torch.Tensor)
                       else type(r).__name__)
        tb = padded_length(n, world, bs) // bs
        lb = tb // world
        if r.shape[2] != lb or r.shape[3] != num_blocks(n, bs):
            raise fail("mask.rows", f"[Bm, Hm, {lb}, {num_blocks(n, bs)}] for seq_len={n}, "
                       f"block_size={bs}, {world} ranks", tuple(r.shape))
        header = torch.tensor([r.shape[0], r.shape[1], n, bs], dtype=torch.int64,
                              device=r.device)
        headers = _all_gather_small(header, world, group)
        if not bool((headers == header).all()):
            raise fail("mask", "LocalMask rows of one batch, head count, seq_len and "
                       "block_size on every rank", headers.tolist())
        order = torch.cat([_block_ids(p, world, lb, layout, r.device) for p in range(world)])
        rows = F.pad(r, (0, tb - r.shape[3]))[..., order]  # [Bm, Hm, Lb, Tb] rank-major
        bm, hm = r.shape[:2]
        mine = _heads_to_kv(rows.view(bm, hm, lb, world, lb).any(2), q_heads, kv_heads)
        mine = mine.permute(2, 0, 1, 3).to(torch.uint8)  # [Psrc, Bm, Hn, Lb]
        need = _all_gather_small(mine, world, group).bool()  # [Pdst, Psrc, Bm, Hn, Lb]
        stats.metadata_bytes = (header.numel() * 8 + mine.numel()) * (world - 1)
    else:
        raise fail("mask", "a BlockSparseMask, a LocalMask or None", type(mask).__name__,
                   cls=TypeError)
    if bm not in (1, batch):
        raise fail("mask", f"batch 1 or {batch}", bm)
    if hm not in (1, kv_heads, q_heads):
        raise fail("mask", f"heads 1, Hkv={kv_heads} or Hq={q_heads}", hm)
    padded = tb * bs
    if not causal and padded != n:
        raise fail("mask", f"a sequence length that is a multiple of 2 * world * block_size "
                   f"= {2 * world * bs} for a non-causal mask (padded keys would be visible)", n)
    L = lb * bs
    tile_bytes = 2 * bs * head_dim * elem_bytes  # one K and one V tile
    stats.dense_ring_bytes = (world - 1) * batch * kv_heads * lb * tile_bytes
    hmap = _head_map(hm, q_heads, kv_heads, rows.device)
    own = rows[..., rank * lb:(rank + 1) * lb]
    self_mask = None
    if bool(own.any()):
        self_mask = BlockSparseMask.from_dense(own.contiguous(), block_size=bs, q_len=L,
                                               kv_len=L, causal=causal, validate=False)
        stats.computed_blocks += int(own.sum()) * (batch // bm)
    plan = CPPlan(rank, world, layout, n, bs, (batch, q_heads, kv_heads, L), self_mask,
                  stats=stats)
    for t in range(1, world):
        dst, src = (rank + t) % world, (rank - t) % world
        out_need = need[dst, rank].expand(batch, kv_heads, lb)  # [B, Hkv, Lb]
        idx = out_need.reshape(-1).nonzero().squeeze(1)
        if idx.numel():
            plan.sends.append((t, dst, idx))
            stats.tiles_sent += idx.numel()
            stats.peers_sent += 1
        small = need[rank, src]  # [Bm, Hn, Lb]
        counts = small.sum(-1)  # [Bm, Hn]
        n_max = int(counts.max())
        if n_max == 0:
            continue
        key = (~small).to(torch.int64) * lb + torch.arange(lb, device=small.device)
        inv = key.argsort(-1)[..., :n_max]  # [Bm, Hn, n_max]: needed blocks, ascending
        valid = torch.arange(n_max, device=small.device) < counts[..., None]  # [Bm, Hn, n_max]
        cols = rows[..., src * lb:(src + 1) * lb]  # [Bm, Hm, Lb, Lb]
        sub = torch.gather(cols, 3, inv[:, hmap, None, :].expand(bm, hm, lb, n_max))
        sub &= valid[:, hmap, None, :]  # [Bm, Hm, Lb, n_max]
        sub_mask = BlockSparseMask.from_dense(sub.contiguous(), block_size=bs, q_len=L,
                                              kv_len=n_max * bs, causal=False, validate=False)
        every = valid.expand(batch, kv_heads, n_max)
        tiles = int(every.sum())
        slots = None if tiles == every.numel() else every.reshape(-1).nonzero().squeeze(1)
        plan.recvs.append(_Recv(t, src, tiles, n_max, slots, sub_mask))
        stats.tiles_received += tiles
        stats.peers_received += 1
        stats.computed_blocks += int(sub.sum()) * (batch // bm)
    stats.bytes_sent = stats.tiles_sent * tile_bytes
    stats.bytes_received = stats.tiles_received * tile_bytes
    return plan


_READY: set = set()


def _ensure_communicator(group) -> None:
    """A first collective on the group before any P2P (NCCL's batch_isend_irecv asks that the
    group's first operation involve every rank)."""
    key = id(dist.group.WORLD if group is None else group)  # a re-created group is new
    if key not in _READY:
        dist.barrier(group=group)
        _READY.add(key)


def _post(plan: CPPlan, k: torch.Tensor, v: torch.Tensor, group):
    """Post every round's sends and receives. Returns ({round: works}, {round: buffer}, keep)."""
    B, Hkv, L, D = k.shape
    bs = plan.block_size
    kt = k.reshape(B * Hkv * (L // bs), bs, D)  # flat tiles, (b, h, block) order
    vt = v.reshape(B * Hkv * (L // bs), bs, D)
    ops: dict[int, list] = {}
    bufs, keep = {}, []
    for t, peer, idx in plan.sends:
        buf = torch.empty(2, idx.numel(), bs, D, dtype=k.dtype, device=k.device)
        torch.index_select(kt, 0, idx, out=buf[0])
        torch.index_select(vt, 0, idx, out=buf[1])
        keep.append(buf)
        ops.setdefault(t, []).append(dist.P2POp(dist.isend, buf, _global_peer(group, peer),
                                                group))
    for rv in plan.recvs:
        buf = torch.empty(2, rv.tiles, bs, D, dtype=k.dtype, device=k.device)
        bufs[rv.round] = buf
        ops.setdefault(rv.round, []).append(dist.P2POp(dist.irecv, buf,
                                                       _global_peer(group, rv.peer), group))
    works = {t: dist.batch_isend_irecv(ops[t]) for t in sorted(ops)}
    return works, bufs, keep


def _unpack(buf: torch.Tensor, rv: _Recv, B: int, Hkv: int):
    """[2, tiles, bs, D] received -> k, v [B, Hkv, n_max * bs, D] (unused slots zero)."""
    bs, D = buf.shape[2], buf.shape[3]
    if rv.slots is not None:
        full = buf.new_zeros(2, B * Hkv * rv.n_max, bs, D)
        full.index_copy_(1, rv.slots, buf)
        buf = full
    kv = buf.view(2, B, Hkv, rv.n_max * bs, D)
    return kv[0], kv[1]


def merge_partial(out: torch.Tensor | None, lse: torch.Tensor | None, o: torch.Tensor,
                  lo: torch.Tensor):
    """Log-sum-exp merge of two partial attentions over disjoint keys.

    out [B, H, L, D] and lse fp32 [B, H, L]: the merge so far (None: nothing yet; the first
    partial is kept as it is, fp32 from the first merge on, updated in place); o [B, H, L, D]
    and lo fp32 [B, H, L] of the new keys. Rows without any key keep out 0 and lse -inf."""
    if out is None:
        return o, lo
    new = torch.logaddexp(lse, lo)
    safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    w_old = torch.exp(lse - safe)[..., None]
    out = out.mul_(w_old) if out.dtype == torch.float32 else out * w_old  # fp32 accumulator
    return out.addcmul_(o, torch.exp(lo - safe)[..., None]), new


def _attention_fn(backend: str, scale, kernel_config):
    """(q, k, v, mask) -> (out, lse) of one step."""
    if kernel_config is None:
        return lambda q, k, v, m: block_sparse_attention(q, k, v, m, scale=scale,
                                                         backend=backend, return_lse=True)
    from adaptive_sparse.attention.triton import triton_block_sparse_attention

    return lambda q, k, v, m: triton_block_sparse_attention(
        q, k, v, m, q.shape[-1] ** -0.5 if scale is None else scale, True, config=kernel_config)


def context_parallel_attention(q_local: torch.Tensor, k_local: torch.Tensor,
                               v_local: torch.Tensor, mask=None, *, seq_len: int | None = None,
                               block_size: int | None = None, group=None,
                               layout: str = "zigzag", scale: float | None = None,
                               backend: str = "auto", plan: CPPlan | None = None,
                               kernel_config: dict | None = None, return_lse: bool = False,
                               return_stats: bool = False):
    """Block-sparse causal self-attention of a sequence sharded over the ranks of `group`.

    q_local [B, Hq, L, D], k_local / v_local [B, Hkv, L, D]: this rank's shard (see
        `shard_sequence`), L = padded_length(N, P, block_size) / P.
    mask: global `BlockSparseMask` (q_len == kv_len == N, identical on every rank), `LocalMask`
        (this rank's rows), or None (dense causal; then seq_len and block_size are required).
    backend: of `block_sparse_attention` for each step ("auto": `attention.api.auto_backend`).
    plan: a `plan_context_parallel` result to reuse (mask is then ignored).
    kernel_config: pins the Triton kernel's tile config for every step (backend "triton"; see
        `triton_block_sparse_attention`): no autotuning and no device sync per step.
    Every rank of the group must call it with the same shapes, mask geometry and layout.

    Returns out [B, Hq, L, D] in q's dtype (padded rows unspecified), then lse fp32 [B, Hq, L]
    when return_lse, then a `CPStats` when return_stats.
    """
    for name, t in (("q_local", q_local), ("k_local", k_local), ("v_local", v_local)):
        check_head_tensor(name, t)
    B, Hq, L, D = q_local.shape
    if k_local.shape != v_local.shape or k_local.shape[0] != B or k_local.shape[2:] != (L, D):
        raise fail("k_local/v_local", f"one shape [{B}, Hkv, {L}, {D}]",
                   (tuple(k_local.shape), tuple(v_local.shape)))
    Hkv = k_local.shape[1]
    if Hq % Hkv:
        raise fail("k_local", f"a KV head count dividing Hq={Hq}", Hkv)
    if plan is None:
        plan = plan_context_parallel(mask, batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                                     elem_bytes=k_local.element_size(), group=group,
                                     layout=layout, seq_len=seq_len, block_size=block_size,
                                     device=q_local.device)
    if plan.shape != (B, Hq, Hkv, L):
        raise fail("q_local", f"shard shapes (B, Hq, Hkv, L) = {plan.shape} (the mask's "
                   f"sequence of {plan.seq_len} over {plan.world} ranks)", (B, Hq, Hkv, L))
    if kernel_config is not None and backend != "triton":
        raise fail("backend", "'triton' when kernel_config is given", backend)
    attend = _attention_fn(backend, scale, kernel_config)
    k_local, v_local = k_local.contiguous(), v_local.contiguous()
    _ensure_communicator(group)
    works, bufs, keep = _post(plan, k_local, v_local, group)
    out = lse = None
    if plan.self_mask is not None:
        o, lo = attend(q_local, k_local, v_local, plan.self_mask)
        out, lse = merge_partial(out, lse, o, lo)
    recv_at = {rv.round: rv for rv in plan.recvs}
    for t in sorted(works):
        for w in works[t]:
            w.wait()
        rv = recv_at.get(t)
        if rv is None:
            continue
        k, v = _unpack(bufs.pop(t), rv, B, Hkv)
        o, lo = attend(q_local, k, v, rv.mask)
        out, lse = merge_partial(out, lse, o, lo)
    del keep
    if out is None:
        out = q_local.new_zeros(B, Hq, L, v_local.shape[-1])
        lse = torch.full((B, Hq, L), float("-inf"), device=q_local.device)
    result = (out.to(q_local.dtype),)
    if return_lse:
        result += (lse,)
    if return_stats:
        result += (plan.stats,)
    return result if len(result) > 1 else result[0]


def all_gather_blocks(x_local: torch.Tensor, *, num_blocks_total: int, group=None,
                      layout: str = "zigzag") -> torch.Tensor:
    """Per-block features of every rank -> global block order.

    x_local [B, H, Lb, F]: this rank's blocks (its chunks in order), e.g. pooled keys.
    Returns [B, H, num_blocks_total, F] (padding blocks dropped)."""
    return gather_sequence(x_local, dim=2, seq_len=num_blocks_total, group=group, layout=layout)


def gate_local_scores(gate, q_local: torch.Tensor, k_local: torch.Tensor, *, seq_len: int,
                      group=None, layout: str = "zigzag") -> torch.Tensor:
    """A gate's block scores for this rank's query blocks, from its local Q and the pooled K of
    every rank (one all_gather of [B, Hkv, Lb, F] pooled blocks; no K/V tokens move).

    gate: `adaptive_sparse.gates.network.Gate`; q_local [B, Hq, L, D] and k_local [B, Hkv, L, D]
    pre-rotary, sharded like `shard_sequence` with the gate's block size.
    Returns float [B, H, Lb, Kb] (gate heads H), -inf outside the causal region and on padding
    rows; equal to the rows of `gate(q, k)` on the full sequence."""
    from adaptive_sparse.gates.network import pool_blocks

    rank, world = _world(group)
    c = gate.config
    bs = c.block_size
    C = q_local.shape[2] // 2
    cb = C // bs
    kb_total = num_blocks(seq_len, bs)
    dtype = gate.wq.dtype
    kinds = tuple(dict.fromkeys(c.k_pooling))
    pooled, q_parts = [], []
    for half, chunk in enumerate(chunk_ids(rank, world, layout)):
        valid = max(0, min(C, seq_len - chunk * C))
        ks = k_local[:, :, half * C:half * C + max(valid, 1)].to(dtype)
        kf = pool_blocks(ks, bs, kinds)
        feats = torch.cat([kf[p] for p in kinds], dim=-1)  # [B, Hkv, nb, F]
        pooled.append(F.pad(feats, (0, 0, 0, cb - feats.shape[2])))
        q_parts.append((chunk, valid, q_local[:, :, half * C:half * C + valid]))
    feats = all_gather_blocks(torch.cat(pooled, dim=2), num_blocks_total=kb_total, group=group,
                              layout=layout)  # [B, Hkv, Kb, P * D]
    kf_all = dict(zip(kinds, feats.split(c.head_dim, dim=-1)))
    rows = []
    for chunk, valid, qc in q_parts:
        out = torch.full((qc.shape[0], c.gate_heads, cb, kb_total), float("-inf"), dtype=dtype,
                         device=q_local.device)
        if valid:
            kv_len = chunk * C + valid
            qf = pool_blocks(qc.to(dtype), bs, c.q_pooling)
            kf = {p: f[:, :, :num_blocks(kv_len, bs)] for p, f in kf_all.items()}
            s = gate.score_pooled(qf, kf, q_len=valid, kv_len=kv_len)  # [B, H, nq, nk]
            out[:, :, :s.shape[2], :s.shape[3]] = s
        rows.append(out)
    return torch.cat(rows, dim=2)


def local_mask_from_scores(scores: torch.Tensor, policy, *, seq_len: int, block_size: int,
                           rank: int, world: int, layout: str = "zigzag") -> LocalMask:
    """A row-local policy (`adaptive_sparse.policies.Policy`) applied to `gate_local_scores`:
    each chunk's rows are selected with that chunk's end-aligned geometry, which is the
    geometry of the same rows in the full sequence."""
    C = scores.shape[2] * block_size // 2
    cb = C // block_size
    kb_total = num_blocks(seq_len, block_size)
    parts = []
    for half, chunk in enumerate(chunk_ids(rank, world, layout)):
        valid = max(0, min(C, seq_len - chunk * C))
        part = torch.zeros(scores.shape[0], scores.shape[1], cb, kb_total, dtype=torch.bool,
                           device=scores.device)
        if valid:
            kv_len = chunk * C + valid
            nq, nk = num_blocks(valid, block_size), num_blocks(kv_len, block_size)
            s = scores[:, :, half * cb:half * cb + nq, :nk]
            m = policy.to_mask(s, q_len=valid, kv_len=kv_len, block_size=block_size)
            part[:, :, :nq, :nk] = m.to_dense()
        parts.append(part)
    return LocalMask(torch.cat(parts, dim=2), seq_len, block_size)


__all__ = ["LAYOUTS", "CPPlan", "CPStats", "LocalMask", "all_gather_blocks", "chunk_ids",
           "context_parallel_attention", "gate_local_scores", "gather_sequence",
           "local_mask", "local_mask_from_scores", "local_positions", "merge_partial",
           "padded_length", "plan_context_parallel", "shard_sequence", "unshard_sequence"]

