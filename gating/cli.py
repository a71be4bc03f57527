"""`adaptive-sparse train`: gate distillation through LightningCLI.

    python -m gating.cli --config gating/configs/smollm2-135m.yaml [--trainer.max_steps 200 ...]
    python -m gating.cli --config ... --print_config
    python -m gating.cli --config ... --ckpt_path runs/gates/smollm2-135m/version_0/checkpoints/last.ckpt

Every field of the module, the datamodule, the trainer and the checkpoint callback is a flag.
The resolved config is saved beside the run (`<log_dir>/config.yaml`), checkpoints keep the best
(by `val/kl`) and the last, and the best gates are exported with `save_gates` to
`<log_dir>/gates` after `fit` (the folder `adaptive-sparse eval --gates` reads). The
featurization runs in `GateDataModule.prepare_data` when the cache is missing.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from gating.module import GateDataModule, GateDistillModule

SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "smollm2-135m.yaml"


class GateCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/kl", "checkpoint.mode": "min",
            "checkpoint.save_last": True, "checkpoint.save_top_k": 1,
            "checkpoint.filename": "best-{step}",
        })
        parser.link_arguments("data.block_size", "model.block_size")

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
        out = module.export_gates(Path(log_dir) / "gates", metadata=meta)
        print(f"gates saved to {out}")


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
    """Run the gate-training CLI on `argv` (default sys.argv[1:]); without a subcommand, `fit`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["fit", *argv]
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return GateCLI(GateDistillModule, GateDataModule, args=argv,
                   trainer_defaults=_trainer_defaults(), seed_everything_default=0,
                   save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    train_main()
