"""`adaptive-sparse train`: gate distillation through LightningCLI.

    adaptive-sparse train --config gating/configs/smollm2-135m.yaml [--trainer.max_steps 200 ...]
    adaptive-sparse train --config ... --print_config
    adaptive-sparse train --config ... \\
        --ckpt_path runs/gates/smollm2-135m/version_0/checkpoints/last.ckpt

Every field of the module, the datamodule, the trainer and the checkpoint callback is a flag.
The resolved config is saved beside the run (`<log_dir>/config.yaml`), checkpoints keep the best
(by `val/kl`) and the last, and the best gates are exported with `save_gates` (a gate artifact,
no policy, the base model's fingerprint from the target cache) to
`<log_dir>/gates` after `fit` (the folder `adaptive-sparse eval --gates` and the sweep read). The
featurization runs in `GateDataModule.prepare_data` when the cache is missing.

Resume. `last.ckpt` is written every `--checkpoint_every_n_steps` optimizer steps (whatever the
validation metric does) and at each validation. `--ckpt_path` resumes a run from a checkpoint it
wrote: the run continues in the same folder (its `version_N`, for every logger), keeps its best
checkpoint and score, and, with the same seed, exports the same gates bit for bit as a run that
was never interrupted. Loading a Lightning checkpoint unpickles it, so only a local file inside
a run folder (`<save_dir>/<name>/version_N/checkpoints/*.ckpt`) that loads with
`torch.load(weights_only=True)` is accepted; a URL is refused.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from gating.module import GateDataModule, GateDistillModule

SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "smollm2-135m.yaml"
RUN_FILE = "run.json"


class LastEveryNSteps(Callback):
    """Write `<checkpoint dir>/last.ckpt` every `every_n_steps` optimizer steps (atomically, by
    Lightning's `save_checkpoint`), so a killed run resumes at most that many steps back."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        ckpt = trainer.checkpoint_callback
        if step == 0 or step % self.every_n_steps or ckpt is None or ckpt.dirpath is None:
            return
        trainer.save_checkpoint(Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}.ckpt")


class RunRecord(Callback):
    """`<log_dir>/run.json`: each logger's folder, so a resume reuses the same versions."""

    def on_fit_start(self, trainer, pl_module) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero or log_dir is None:
            return
        from adaptive_sparse.io import atomic_write_json

        atomic_write_json(Path(log_dir) / RUN_FILE, {
            "loggers": [{"class": type(lg).__name__, "log_dir": lg.log_dir}
                        for lg in trainer.loggers]})


def check_resume(ckpt_path: str) -> tuple[Path, dict]:
    """The run folder of checkpoint `ckpt_path` and its run record; ValueError naming
    --ckpt_path for a URL, a missing file, a file outside a run folder or one that does not
    load as weights only (Lightning would unpickle it)."""
    import torch

    flag = "--ckpt_path"
    if "://" in ckpt_path:
        raise ValueError(f"{flag}: expected a local checkpoint file, got the URL {ckpt_path!r} "
                         f"(remote checkpoints are refused: loading one unpickles it)")
    path = Path(ckpt_path)
    if not path.is_file():
        raise ValueError(f"{flag}: expected a checkpoint file such as runs/gates/<name>/"
                         f"version_N/checkpoints/last.ckpt, got {ckpt_path!r} "
                         f"({'a folder' if path.is_dir() else 'no such file'})")
    run = path.resolve().parent.parent
    if path.resolve().parent.name != "checkpoints" or not (run / RUN_FILE).is_file():
        raise ValueError(f"{flag}: expected a checkpoint inside a run folder written by "
                         f"`adaptive-sparse train` (<run>/checkpoints/*.ckpt beside "
                         f"<run>/{RUN_FILE}), got {ckpt_path!r}; only checkpoints a run wrote "
                         f"itself are loaded (loading unpickles)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{flag}: {ckpt_path} is not a checkpoint written by training "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
                         ) from None
    if not isinstance(state, dict) or not {"state_dict", "global_step", "loops"} <= set(state):
        raise ValueError(f"{flag}: {ckpt_path} is not a Lightning training checkpoint (no "
                         f"state_dict/global_step/loops)")
    try:
        record = json.loads((run / RUN_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag}: cannot read {run / RUN_FILE}: {e}") from None
    return run, record


class GateCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/kl", "checkpoint.mode": "min",
            "checkpoint.save_last": True, "checkpoint.save_top_k": 1,
            "checkpoint.filename": "best-{step}",
            # last.ckpt is shared with LastEveryNSteps: overwrite it, never last-v1.ckpt
            "checkpoint.enable_version_counter": False,
        })
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=50,
                            help="write checkpoints/last.ckpt every N optimizer steps, "
                                 "independently of validation (resume loses at most N steps)")
        parser.link_arguments("data.block_size", "model.block_size")

    def parse_arguments(self, parser, args) -> None:
        """Parse, then check the values Lightning would act on before any hook: the checkpoint
        (LightningCLI reads its hyperparameters right after parsing) and the step counts."""
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        trainer = cfg["trainer"]
        max_steps, max_epochs = trainer.get("max_steps"), trainer.get("max_epochs")
        if max_steps is not None and max_steps < 1 and not (max_steps == -1 and max_epochs):
            raise ValueError(f"trainer.max_steps: expected a positive int (or -1 with "
                             f"trainer.max_epochs set), got {max_steps}")
        every = cfg.get("checkpoint_every_n_steps")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"checkpoint_every_n_steps: expected a positive int, got {every!r}")
        ckpt = cfg.get("ckpt_path")
        self._resume = None
        if ckpt is not None:
            if ckpt in ("last", "best", "hpc", "registry"):
                raise ValueError(f"--ckpt_path: expected a checkpoint file of a run folder, got "
                                 f"{ckpt!r}")
            self._resume = check_resume(str(ckpt))

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit" and self._resume is not None:
            self._resume_in_place(self.config[self.subcommand], *self._resume)

    def _resume_in_place(self, cfg, run: Path, record: dict) -> None:
        """Point every logger at the version folder the checkpoint's run used."""
        loggers = cfg["trainer"].get("logger")
        loggers = loggers if isinstance(loggers, list) else [loggers]
        recorded = record.get("loggers", [])
        configured = [lg for lg in loggers if hasattr(lg, "class_path")]
        names = [lg.class_path.rsplit(".", 1)[-1] for lg in configured]
        if names != [r.get("class") for r in recorded] or not configured:
            raise ValueError(f"--ckpt_path: the run {run} was written with loggers "
                             f"{[r.get('class') for r in recorded]}, this config has {names}; "
                             f"resume with the run's own config ({run / 'config.yaml'})")
        if Path(recorded[0]["log_dir"]).resolve() != run:
            raise ValueError(f"--ckpt_path: {run} is not the folder this config's first logger "
                             f"writes ({recorded[0]['log_dir']})")
        for lg, rec in zip(configured, recorded):
            lg.init_args.version = Path(rec["log_dir"]).name

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer.callbacks.extend([LastEveryNSteps(cfg["checkpoint_every_n_steps"]), RunRecord()])
        return trainer

    def after_fit(self) -> None:
        trainer = self.trainer
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero or log_dir is None:
            return
        module = self.model
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        meta = {"source": "last"}
        if best:
            import torch

            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            gates = {k[len("gates."):]: v for k, v in state.items() if k.startswith("gates.")}
            module.gates.load_state_dict(gates)
            meta = {"source": Path(best).name}
        out = module.export_gates(Path(log_dir) / "gates", metadata=meta,
                                  model=base_model_fingerprint(self.datamodule))
        print(f"gates saved to {out}")


def base_model_fingerprint(datamodule) -> dict | None:
    """The fingerprint of the model the training targets came from (recorded in the target
    cache by `gating.targets.featurize`), stored in the exported gate folder; None when the
    cache holds none or one of an older form (the folder then records no base model)."""
    from adaptive_sparse.export.format import check_fingerprint_field
    from gating.targets import read_manifest

    try:
        fp = read_manifest(datamodule.split_dir("train"))["key"]["fingerprint"]
        check_fingerprint_field(fp)  # ArtifactError is a ValueError
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return fp


def _trainer_defaults() -> dict:
    return {
        "max_steps": 200,
        "val_check_interval": None,
        "check_val_every_n_epoch": 1,
        "log_every_n_steps": 5,
        "default_root_dir": "runs/gates",
        "logger": [
            {"class_path": "lightning.pytorch.loggers.CSVLogger",
             "init_args": {"save_dir": "runs/gates", "name": "smollm2-135m"}},
            {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
             "init_args": {"save_dir": "runs/gates/smollm2-135m", "name": "tensorboard"}},
        ],
    }


def train_main(argv: list[str] | None = None) -> GateCLI:
    """Run the gate-training CLI on `argv` (default sys.argv[1:]); without a subcommand, `fit`.
    Bad settings (a negative max_steps, a remote or foreign --ckpt_path) raise ValueError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["fit", *argv]
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return GateCLI(GateDistillModule, GateDataModule, args=argv,
                   trainer_defaults=_trainer_defaults(), seed_everything_default=0,
                   save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    try:
        train_main()
    except ValueError as e:
        print(f"train: error: {e}", file=sys.stderr)
        sys.exit(2)
