"""Lightning distillation of all layers' gates from a featurized cache (`gating.targets`).

Loss per layer: KL(target || softmax(gate scores)) over each query-block row of the block-causal
region (or MSE between the two distributions), averaged over rows, heads, batch and layers. With
shared KV-group gates the target is the row-normalized mean of the group's query-head targets.

Metrics (torchmetrics, per step and per epoch): `kl`; `recall@d` for d in `recall_densities`:
attention mass (block_sum) inside the mask of `Policy(kind="density", density=d)` applied to the
gate scores (sink and diagonal kept, as at inference), with `oracle_recall@d` the same policy on
the true block_sum in validation; `density@tau` / `recall@tau`: the mask of blocks whose gate
probability is >= `threshold`.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchmetrics import MeanMetric

from adaptive_sparse.errors import fail
from adaptive_sparse.masks import block_causal
from adaptive_sparse.gates import GateConfig, GateSet
from adaptive_sparse.models.config import text_config

LOSSES = ("kl", "mse")
# distillation target, normalized per query-block row: "max" (block max of the attention
# probabilities, SeerAttention's) or "sum" (the attention mass of each block)
TARGETS = ("max", "sum")
SPLITS = ("train", "validation")


def _metric_name(prefix: str, value: float) -> str:
    return f"{prefix}@{value:g}"


def group_targets(target: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B, Hq, Qb, Kb] row distributions -> [B, Hq / G, Qb, Kb]: the group mean, renormalized."""
    if group_size == 1:
        return target
    B, Hq, Qb, Kb = target.shape
    t = target.view(B, Hq // group_size, group_size, Qb, Kb).mean(2)
    return t / t.sum(-1, keepdim=True).clamp_min(1e-30)


def distill_loss(scores: torch.Tensor, target: torch.Tensor, allowed: torch.Tensor,
                 kind: str = "kl") -> torch.Tensor:
    """scores [B, H, Qb, Kb] (-inf outside `allowed` [Qb, Kb]), target rows summing to 1.

    kl: mean over rows of sum_j t_j (log t_j - log softmax(s)_j); mse: mean over rows of
    sum_j (softmax(s)_j - t_j)^2."""
    logp = torch.log_softmax(scores, dim=-1).masked_fill(~allowed, 0.0)
    t = target.masked_fill(~allowed, 0.0)
    if kind == "kl":
        per_row = (torch.xlogy(t, t) - t * logp).sum(-1)
    elif kind == "mse":
        per_row = ((logp.exp().masked_fill(~allowed, 0.0) - t) ** 2).sum(-1)
    else:
        raise fail("loss", f"one of {LOSSES}", kind)
    return per_row.mean()


def recall_of(block_sum: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean attention mass kept: block_sum [B, Hq, Qb, Kb], keep bool [B, H, Qb, Kb] (H | Hq)."""
    Hq, H = block_sum.shape[1], keep.shape[1]
    if H != Hq:
        keep = keep.repeat_interleave(Hq // H, dim=1)
    return (block_sum * keep).sum(-1).mean()


class GateDistillModule(L.LightningModule):
    """Trains a `GateSet` on cached features.

    model_shapes: num_layers, num_heads, num_kv_heads, head_dim, rope_theta, rope_inv_freq;
    None -> taken from the datamodule's cache in `configure_model` (and then saved in the
    hyperparameters, so checkpoints load with `load_from_checkpoint`).
    The gate options (block_size .. init) are those of `GateConfig`."""

    def __init__(self, model_shapes: dict | None = None, block_size: int = 64,
                 gate_dim: int | None = None, q_pooling: tuple[str, ...] = ("avg",),
                 k_pooling: tuple[str, ...] = ("max", "min", "avg"),
                 share_kv_group: bool = False, use_rotary: bool = True,
                 init: str = "identity", loss: str = "kl", lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 20, min_lr_ratio: float = 0.05,
                 threshold: float = 0.01,
                 recall_densities: tuple[float, ...] = (0.1, 0.25, 0.5), target: str = "max"):
        super().__init__()
        if loss not in LOSSES:
            raise fail("loss", f"one of {LOSSES}", loss)
        if target not in TARGETS:
            raise fail("target", f"one of {TARGETS}", target)
        for name, v in (("lr", lr), ("threshold", threshold)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v:
                raise fail(name, "a positive number", v)
        if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise fail("weight_decay", "a number >= 0", weight_decay)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise fail("warmup_steps", "an int >= 0", warmup_steps)
        if not 0 <= min_lr_ratio <= 1:
            raise fail("min_lr_ratio", "a number in [0, 1]", min_lr_ratio)
        for d in recall_densities:
            if not 0 < d <= 1:
                raise fail("recall_densities", "values in (0, 1]", d)
        self.save_hyperparameters()
        self.gates: GateSet | None = None
        self._gate_options = dict(block_size=block_size, gate_dim=gate_dim,
                                  q_pooling=tuple(q_pooling), k_pooling=tuple(k_pooling),
                                  share_kv_group=share_kv_group, use_rotary=use_rotary, init=init)
        if model_shapes is not None:
            self._build(model_shapes)
        else:
            probe_dim = gate_dim if isinstance(gate_dim, int) and gate_dim > 0 else 64
            GateConfig(num_layers=1, num_heads=1, num_kv_heads=1, head_dim=probe_dim,
                       **self._gate_options)
        self.metrics = torch.nn.ModuleDict()
        for stage in ("train", "val"):
            names = ["kl", "loss", _metric_name("density", threshold),
                     _metric_name("recall", threshold)]
            names += [_metric_name("recall", d) for d in recall_densities]
            if stage == "val":
                names += [_metric_name("oracle_recall", d) for d in recall_densities]
            for n in names:
                self.metrics[f"{stage}_{n}".replace(".", "_")] = MeanMetric()

    def _build(self, shapes: dict) -> None:
        keys = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "rope_theta",
                "rope_inv_freq")
        shapes = {k: shapes[k] for k in keys if k in shapes}
        self.gate_config = GateConfig(**shapes, **self._gate_options)
        self.gates = GateSet(self.gate_config)
        self.hparams["model_shapes"] = {k: list(v) if isinstance(v, tuple) else v
                                        for k, v in shapes.items()}

    def configure_model(self) -> None:
        if self.gates is not None:
            return
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        shapes = getattr(dm, "model_shapes", None)
        if shapes is None:
            raise fail("model_shapes", "shapes given, or a GateDataModule whose cache has them",
                        None)
        if dm.block_size != self.hparams.block_size:
            raise fail("block_size", f"{dm.block_size} (that of the cache)",
                        self.hparams.block_size)
        self._build(shapes)

    def _metric(self, stage: str, name: str) -> MeanMetric:
        return self.metrics[f"{stage}_{name}".replace(".", "_")]

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        from adaptive_sparse.policies import Policy

        c = self.gate_config
        hp = self.hparams
        n = batch["tokens"].shape[-1]
        allowed = block_causal(n, n, c.block_size, device=batch["tokens"].device)  # [Qb, Kb]
        losses, kls = [], []
        logs = {}
        for layer, gate in enumerate(self.gates):
            qf = {p: batch[f"L{layer}.q.{p}"] for p in c.q_pooling}
            kf = {p: batch[f"L{layer}.k.{p}"] for p in c.k_pooling}
            scores = gate.score_pooled(qf, kf, q_len=n, kv_len=n)  # [B, H, Qb, Kb]
            target = batch[f"L{layer}.block_{hp.get('target', 'max')}"].float()
            target = target / target.sum(-1, keepdim=True).clamp_min(1e-30)
            target = group_targets(target, c.group_size if c.share_kv_group else 1)
            kl = distill_loss(scores, target, allowed, "kl")
            kls.append(kl)
            losses.append(kl if hp.loss == "kl" else distill_loss(scores, target, allowed, "mse"))
            with torch.no_grad():
                block_sum = batch[f"L{layer}.block_sum"].float()
                probs = torch.softmax(scores.detach(), dim=-1)
                keep = (probs >= hp.threshold) & allowed
                logs.setdefault(_metric_name("density", hp.threshold), []).append(
                    keep.float().sum() / (allowed.sum() * keep.shape[0] * keep.shape[1]))
                logs.setdefault(_metric_name("recall", hp.threshold), []).append(
                    recall_of(block_sum, keep))
                for d in hp.recall_densities:
                    policy = Policy(kind="density", density=float(d))
                    sel = policy.select(scores.detach(), q_len=n, kv_len=n,
                                        block_size=c.block_size)
                    logs.setdefault(_metric_name("recall", d), []).append(
                        recall_of(block_sum, sel))
                    if stage == "val":
                        osel = policy.select(block_sum, q_len=n, kv_len=n,
                                             block_size=c.block_size, scores_are_probs=True)
                        logs.setdefault(_metric_name("oracle_recall", d), []).append(
                            recall_of(block_sum, osel))
        loss = torch.stack(losses).mean()
        logs["kl"] = kls
        logs["loss"] = [loss.detach()]
        bsz = batch["tokens"].shape[0]
        on_step = stage == "train"
        for name, values in logs.items():
            metric = self._metric(stage, name)
            metric.update(torch.stack([v.detach().float() for v in values]).mean(), bsz)
            self.log(f"{stage}/{name}", metric, on_step=on_step, on_epoch=True,
                     prog_bar=name in ("kl",) or name.startswith("recall@0.1"),
                     batch_size=bsz)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.gates.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = min(hp.warmup_steps, total)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            frac = min(1.0, (step - warm) / max(1, total - warm))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export_gates(self, directory, *, metadata: dict | None = None,
                     model: dict | None = None) -> Path:
        """Save the gate set with `adaptive_sparse.gates.save_gates` (a gate artifact without a
        policy); `model`: the base model's fingerprint, when known."""
        from adaptive_sparse.gates import save_gates

        meta = {"global_step": int(self.global_step)} | (metadata or {})
        return save_gates(self.gates, directory, metadata=meta, model=model)


class CacheDataset(Dataset):
    """Sequences of a `GateCache`; an item is the shard's dict of tensors."""

    def __init__(self, cache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict:
        return self.cache.load(i)


class StreamSampler(Sampler):
    """Epochs of `n` items cut from one endless stream of seeded permutations (permutation `e`
    drawn from `seed + e`), starting where the trainer's global step says.

    The stream position is `start()` (samples already consumed), so a run resumed from any
    checkpoint sees exactly the items an uninterrupted run would have seen."""

    def __init__(self, n: int, seed: int = 0, start=None):
        self.n, self.seed = n, seed
        self.start = start or (lambda: 0)

    def _perm(self, e: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + e)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        pos = int(self.start())
        e, off = divmod(pos, self.n)
        items = self._perm(e)[off:] + self._perm(e + 1)[:off]
        return iter(items)

    def __len__(self) -> int:
        return self.n


class GateDataModule(L.LightningDataModule):
    """Cached features for gate training, featurized on first use (`prepare_data`).

    cache_dir/train and cache_dir/validation are separate caches whose sequences are packed from
    disjoint documents (`adaptive_sparse.data.split_documents`), so validation is split by
    document. corpus: a corpus spec of `adaptive_sparse.data.load_corpus`, or "random" (uniform
    random tokens; each sequence its own document), for smoke tests.
    model: a preset / GGUF / HF folder for `adaptive_sparse.models.load_model`; needed only
    when a cache must be (re)built.
    num_threads: torch intra-op threads for featurization and training (None: leave as is).
    The gate tensors are tiny, and on a shared CPU 1 thread was 17x faster per training step
    and 3x faster per featurized layer than 2 (thread synchronization dominates)."""

    def __init__(self, cache_dir: str = "runs/gate_cache/smollm2-135m", model: str | None =
                 "smollm2-135m", corpus: str = "default", seq_len: int = 2048,
                 block_size: int = 64, num_train: int = 16, num_val: int = 4,
                 val_fraction: float = 0.2, split_seed: int = 0, batch_size: int = 1,
                 num_workers: int = 0, shuffle_seed: int = 0, featurize_device: str = "auto",
                 progress: bool = True, num_threads: int | None = None):
        super().__init__()
        for name, v in (("seq_len", seq_len), ("num_train", num_train), ("num_val", num_val),
                        ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise fail(name, "a positive int", v)
        from adaptive_sparse.masks import SUPPORTED_BLOCK_SIZES

        if block_size not in SUPPORTED_BLOCK_SIZES:
            raise fail("block_size", f"one of {SUPPORTED_BLOCK_SIZES}", block_size)
        if not 0 < val_fraction < 1:
            raise fail("val_fraction", "a number in (0, 1)", val_fraction)
        if num_threads is not None and (isinstance(num_threads, bool)
                                        or not isinstance(num_threads, int) or num_threads < 1):
            raise fail("num_threads", "a positive int or None", num_threads)
        self.save_hyperparameters()
        self.cache_dir = Path(cache_dir)
        self.block_size = block_size
        self.caches = {}

    def split_dir(self, split: str) -> Path:
        return self.cache_dir / split

    def expected_key(self, split: str, fingerprint=None) -> dict:
        from gating.targets import cache_key

        hp = self.hparams
        return cache_key(model=hp.model, fingerprint=fingerprint, corpus=hp.corpus, split=split,
                         seq_len=hp.seq_len, block_size=hp.block_size)

    def _ready(self, split: str) -> bool:
        from gating.targets import check_key, read_manifest

        manifest = read_manifest(self.split_dir(split))
        if manifest is None:
            return False
        check_key(manifest["key"], self.expected_key(split), self.split_dir(split))
        want = self.hparams.num_train if split == "train" else self.hparams.num_val
        return bool(manifest.get("complete")) and len(manifest["shards"]) >= want

    def _threads(self) -> None:
        if self.hparams.num_threads is not None:
            torch.set_num_threads(self.hparams.num_threads)

    def prepare_data(self) -> None:
        self._threads()
        todo = [s for s in SPLITS if not self._ready(s)]
        if not todo:
            return
        hp = self.hparams
        if hp.model is None:
            raise fail("model", f"a model to featurize the missing cache(s) {todo} in "
                        f"{self.cache_dir}", None)
        from adaptive_sparse.models import load_model
        from gating.targets import featurize

        model, tokenizer = load_model(hp.model)
        device = hp.featurize_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        sequences = self._sequences(tokenizer, model)
        for split in todo:
            featurize(model, sequences[split], self.split_dir(split), model_name=hp.model,
                      corpus=hp.corpus, split=split, block_size=hp.block_size,
                      progress=hp.progress)

    def _sequences(self, tokenizer, model) -> dict:
        hp = self.hparams
        if hp.corpus == "random":
            g = torch.Generator().manual_seed(hp.split_seed)
            vocab = text_config(model).vocab_size
            return {"train": torch.randint(0, vocab, (hp.num_train, hp.seq_len), generator=g),
                    "validation": torch.randint(0, vocab, (hp.num_val, hp.seq_len), generator=g)}
        from adaptive_sparse.data import load_corpus, pack, split_documents

        docs = load_corpus(hp.corpus)
        parts = split_documents(docs, seed=hp.split_seed,
                                fractions=(1 - hp.val_fraction, hp.val_fraction, 0.0))
        out = {}
        for split, want in (("train", hp.num_train), ("validation", hp.num_val)):
            seqs = pack(tokenizer, parts[split], hp.seq_len, want)
            if seqs.shape[0] < want:
                raise fail("corpus", f"enough {split} text for {want} sequences of "
                            f"{hp.seq_len} tokens", f"{seqs.shape[0]} sequences")
            out[split] = seqs
        return out

    def setup(self, stage: str | None = None) -> None:
        from gating.targets import GateCache

        self._threads()
        for split in SPLITS:
            if split not in self.caches:
                self.caches[split] = GateCache(self.split_dir(split), self.expected_key(split))

    @property
    def model_shapes(self) -> dict | None:
        from gating.targets import read_manifest

        for split in SPLITS:
            manifest = read_manifest(self.split_dir(split))
            if manifest is not None:
                return manifest["shapes"]
        return None

    def _limit(self, split: str) -> torch.utils.data.Subset:
        n = self.hparams.num_train if split == "train" else self.hparams.num_val
        ds = CacheDataset(self.caches[split])
        return torch.utils.data.Subset(ds, range(min(n, len(ds))))

    def train_dataloader(self):
        ds = self._limit("train")
        per_step = self.hparams.batch_size

        def consumed() -> int:
            t = self.trainer
            if t is None:
                return 0
            return t.global_step * t.accumulate_grad_batches * per_step * t.world_size

        return DataLoader(ds, batch_size=per_step,
                          sampler=StreamSampler(len(ds), self.hparams.shuffle_seed, consumed),
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self):
        return DataLoader(self._limit("validation"), batch_size=self.hparams.batch_size,
                          shuffle=False, num_workers=self.hparams.num_workers)

