"""Sparse-aware adaptation (issue 13): a LoRA on the frozen base model, trained under the learned
gate's masks so the model learns to undo the error the sparsity makes.

Student: the model with its adapter on (`adaptive_sparse.adapters`) and every layer's attention
routed through `models.sparse_attention` with a frozen `GateProvider` (masks built under
no_grad from the layer's captured pre-rotary q/k, so the gate sees the adapted q/k as it will at
inference). Teacher (loss "kl", the default): the same model object with its adapter off and its
own dense attention; loss KL(teacher || student) of the next-token distributions, summed over
positions and divided by their count. Loss "lm": the next-token cross entropy of the student.
The [N, vocab] logits never exist at once: the LM head and the loss run per chunk of positions,
each chunk checkpointed (recomputed in the backward). The decoder runs with gradient
checkpointing. Only the adapter's parameters train; they are this module's only state, so a
Lightning checkpoint holds the adapter and its optimizer, never the base model.

Attention under masks must be differentiable: backend "flex" (compiled FlexAttention with the
mask's BlockMask, CUDA) or "reference" (PyTorch, dense-masked per chunk of rows: CPU tests).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from adaptive_sparse.adapters import DEFAULT_TARGETS, adapters_disabled, attach_lora, get_lora
from adaptive_sparse.errors import fail

LOSSES = ("kl", "lm")
TRAIN_BACKENDS = ("flex", "reference")


def default_backend(device) -> str:
    """"flex" on CUDA, else "reference" (the differentiable paths of `block_sparse_attention`)."""
    return "flex" if torch.device(device).type == "cuda" else "reference"


class AdaptModule(L.LightningModule):
    """Trains the LoRA of `model` under the masks of `gate_set` (see the module docstring).

    model: a transformers causal LM (kept out of this module's state; moved to its device by
    the caller); gate_set: a GateSet or a gate folder; densities: the density policies
    (`Policy("density")`) of the training masks, one per step in turn; chunk: positions per
    LM-head chunk."""

    def __init__(self, model, gate_set, *, rank: int = 16, alpha: float = 32.0,
                 targets=DEFAULT_TARGETS, loss: str = "kl", densities=(0.05, 0.1),
                 lr: float = 2e-4, warmup: int = 10, total_steps: int = 100,
                 block_size: int = 64, backend: str = "flex", chunk: int = 1024,
                 gate_fast: bool | None = None, log_every: int = 10):
        super().__init__()
        from adaptive_sparse.gates import GateProvider
        from adaptive_sparse.policies import Policy

        if loss not in LOSSES:
            raise fail("loss", f"one of {LOSSES}", loss)
        if backend not in TRAIN_BACKENDS:
            raise fail("backend", f"one of {TRAIN_BACKENDS} (differentiable)", backend)
        densities = tuple(float(d) for d in densities)
        if not densities or not all(0 < d <= 1 for d in densities):
            raise fail("densities", "densities in (0, 1]", densities)
        for name, v in (("lr", lr), ("chunk", chunk), ("total_steps", total_steps)):
            if not v > 0:
                raise fail(name, "a positive number", v)
        self.__dict__["model"] = model  # not a submodule: never in the state_dict
        lora = get_lora(model)
        self.lora = lora if lora is not None else attach_lora(model, rank, alpha, targets)
        self.loss_kind, self.densities = loss, densities
        self.lr, self.warmup, self.total_steps = lr, warmup, total_steps
        self.block_size, self.backend, self.chunk = block_size, backend, chunk
        self.log_every = log_every
        self.provider = GateProvider(gate_set, Policy("density", density=densities[0]), None,
                                     fast=gate_fast, cuda_graphs=False)  # attached by start()
        self.provider.gate_set.requires_grad_(False)
        self.tokens = 0
        self._t0 = None

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.lora.parameters(), lr=self.lr, weight_decay=0.0)
        warm, total = max(1, self.warmup), self.total_steps

        def schedule(step):
            if step < warm:
                return (step + 1) / warm
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm)
                                                                   / max(1, total - warm))))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def start(self) -> None:
        """Route the model's attention through the gate's masks, turn on gradient
        checkpointing and training mode, until `stop()`. The routing spans the backward too:
        the checkpointed layers are recomputed there, under the same masks."""
        from adaptive_sparse.models import enable_sparse_attention

        model = self.model
        self.provider.gate_set.to(next(model.parameters()).device)
        self.provider.attach(model)
        self.provider.clear_caches()
        model.config.use_cache = False
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        enable_sparse_attention(model, self.provider, block_size=self.block_size,
                                backend=self.backend)

    def stop(self) -> None:
        from adaptive_sparse.models import disable_sparse_attention

        disable_sparse_attention(self.model)
        self.provider.detach()
        off = getattr(self.model, "activation_checkpointing_disable", None) \
            or getattr(self.model, "gradient_checkpointing_disable", None)
        if off is not None:
            off()
        self.model.eval()

    def on_fit_start(self) -> None:
        self.start()

    def on_fit_end(self) -> None:
        self.stop()

    def student_loss(self, ids: torch.Tensor, density: float | None = None):
        """(summed loss over predicted positions, count) of ids LongTensor [B, N] with the
        adapter on and the gate's masks at `density` (default: the first training density);
        gradients reach only the adapter. Call between `start()` and `stop()` (the fit does),
        backward included."""
        from adaptive_sparse.models import observe_attention
        from adaptive_sparse.policies import Policy

        model = self.model
        decoder = model.get_decoder()
        d = self.densities[0] if density is None else density
        if self.provider.policy.density != d:
            self.provider.policy = Policy("density", density=d)
        teacher = None
        if self.loss_kind == "kl":
            # dense SDPA on every layer (nested over the routing, restored on exit)
            with torch.no_grad(), adapters_disabled(model), observe_attention(model, _ignore):
                teacher = decoder(input_ids=ids, use_cache=False).last_hidden_state
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state  # [B, N, d]
        return chunked_loss(model, hidden, ids, teacher, chunk=self.chunk)

    def training_step(self, batch, batch_idx):
        ids = batch[0] if isinstance(batch, (list, tuple)) else batch  # [B, N]
        d = self.densities[self.global_step % len(self.densities)]
        total, count = self.student_loss(ids, d)
        loss = total / count
        self.tokens += ids.numel()
        self.log("train_loss", loss.detach(), prog_bar=False, on_step=True, batch_size=1)
        step = self.global_step + 1
        if self.log_every and (step % self.log_every == 0 or step == 1):
            now = time.perf_counter()
            self._t0 = self._t0 or now
            print(f"  adapt step {step}/{self.total_steps} density {d:g} {self.loss_kind} "
                  f"{float(loss):.4f} tokens {self.tokens} [{now - self._t0:.0f} s]",
                  flush=True)
        return loss


def _ignore(call) -> None:
    """An observer that records nothing (the teacher's dense pass)."""


def chunked_loss(model, hidden: torch.Tensor, ids: torch.Tensor, teacher=None, *,
                 chunk: int = 1024):
    """(summed loss, count) over the N - 1 predicted positions of ids [B, N]: KL(teacher ||
    student) of the next-token distributions when `teacher` (hidden states [B, N, d]) is
    given, else the cross entropy; the LM head applied per `chunk` positions, each chunk
    checkpointed (its [B, chunk, vocab] logits recomputed in the backward)."""
    from adaptive_sparse.evaluate import lm_logits

    def logits_of(h):
        return lm_logits(model, h)

    def kl(hs, ht):
        return F.kl_div(F.log_softmax(logits_of(hs), -1), F.log_softmax(logits_of(ht), -1),
                        log_target=True, reduction="sum")

    def ce(hs, tgt):
        x = logits_of(hs)
        return F.cross_entropy(x.reshape(-1, x.shape[-1]), tgt.reshape(-1), reduction="sum")

    N = ids.shape[1]
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, N - 1, chunk):
        j = min(N - 1, i + chunk)
        hs = hidden[:, i:j]
        if teacher is not None:
            part = checkpoint(kl, hs, teacher[:, i:j], use_reentrant=False)
        else:
            part = checkpoint(ce, hs, ids[:, i + 1:j + 1], use_reentrant=False)
        total = total + part
    return total, ids.shape[0] * (N - 1)


class _Progress(L.Callback):
    """Saves nothing; keeps the wall time of the fit (resumed runs add theirs)."""

    def __init__(self):
        self.seconds = 0.0

    def on_train_start(self, trainer, pl_module):
        self._t = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds += time.perf_counter() - self._t


def train_adapter(model, gate_set, sequences: torch.Tensor, out, *, steps: int, lr: float = 2e-4,
                  rank: int = 16, alpha: float = 32.0, targets=DEFAULT_TARGETS,
                  loss: str = "kl", densities=(0.05, 0.1), block_size: int = 64,
                  backend: str | None = None, device: str = "cpu", chunk: int = 1024,
                  checkpoint_every: int = 25, seed: int = 0, gate_fast: bool | None = None,
                  log_every: int = 10) -> dict:
    """Train the adapter of `model` (attached here when it has none) for `steps` steps of one
    training sequence each (sequences LongTensor [S, N], shuffled per epoch), checkpointing to
    OUT/checkpoints/last.ckpt every `checkpoint_every` steps; a rerun resumes from it (and
    trains nothing when it already reached `steps`). Returns {steps, tokens, seconds (every
    fit of the run, resumed ones added), loss, final train loss, ...}. `model` must already
    be on `device`."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from adaptive_sparse.io import atomic_write_json

    from gating.cli import RUN_FILE, check_resume

    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or len(sequences) < 1:
        raise fail("sequences", "token ids LongTensor [S, N] with S >= 1",
                   getattr(sequences, "shape", type(sequences).__name__))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise fail("steps", "a positive int", steps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    backend = backend or default_backend(device)
    L.seed_everything(seed, workers=False, verbose=False)
    module = AdaptModule(model, gate_set, rank=rank, alpha=alpha, targets=targets, loss=loss,
                         densities=densities, lr=lr, total_steps=steps, block_size=block_size,
                         backend=backend, chunk=chunk, gate_fast=gate_fast,
                         log_every=log_every, warmup=max(1, steps // 10))
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    resume, spent = None, 0.0
    if last.is_file() and (out / RUN_FILE).is_file():
        check_resume(str(last))  # weights-only load first: Lightning's own load unpickles
        resume = str(last)
        spent = float(json.loads((out / RUN_FILE).read_text()).get("seconds", 0.0))
    record = {"kind": "adapter", "steps": steps, "seq_len": int(sequences.shape[1]),
              "seconds": spent}
    atomic_write_json(out / RUN_FILE, record)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                           every_n_train_steps=max(1, checkpoint_every),
                           enable_version_counter=False)
    timer = _Progress()
    accel = "gpu" if torch.device(device).type == "cuda" else "cpu"
    trainer = L.Trainer(accelerator=accel, devices=1, max_steps=steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ckpt, timer], num_sanity_val_steps=0,
                        gradient_clip_val=1.0, precision="32-true",
                        default_root_dir=str(out))
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(sequences), batch_size=1, shuffle=True, generator=gen)
    trainer.fit(module, loader, ckpt_path=resume)
    # Lightning's teardown leaves the module (the adapter, its one submodule) on the CPU
    module.to(device)
    model.eval()
    atomic_write_json(out / RUN_FILE, {**record, "seconds": spent + timer.seconds})
    return {"steps": int(trainer.global_step), "tokens_per_step": int(sequences.shape[1]),
            "tokens": int(trainer.global_step) * int(sequences.shape[1]),
            "seconds": spent + timer.seconds, "loss": loss, "densities": list(module.densities),
            "backend": backend, "lr": lr, "rank": module.lora.rank,
            "alpha": module.lora.alpha, "targets": list(module.lora.targets),
            "final_train_loss": float(trainer.callback_metrics.get("train_loss", float("nan"))),
            "resumed_from": resume}
