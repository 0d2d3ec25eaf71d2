"""The built-in trackers: TensorBoard event files, Weights & Biases, MLflow.

Each imports its package only when opened. TensorBoard writes event files into
``<run_dir>/tensorboard`` (``tensorboard --logdir runs/`` shows every run). W&B and MLflow
read their own settings from the environment (``WANDB_PROJECT``, ``WANDB_MODE``,
``MLFLOW_TRACKING_URI``, ...); evomerge passes the run name and config only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import RunLogger, register

TENSORBOARD_DIR = "tensorboard"


@register
class TensorBoardLogger(RunLogger):
    name = "tensorboard"
    requires = "tensorboard"

    def open(self, run_name: str, run_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))

    def log_scalars(self, step: int, scalars: dict[str, float], wall_time: float | None) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step, walltime=wall_time)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


@register
class WandbLogger(RunLogger):
    name = "wandb"
    requires = "wandb"

    def open(self, run_name: str, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(name=run_name, config=config, dir=str(run_dir), reinit=True)

    def log_scalars(self, step: int, scalars: dict[str, float], wall_time: float | None) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


@register
class MlflowLogger(RunLogger):
    name = "mlflow"
    requires = "mlflow"

    def open(self, run_name: str, run_dir: Path, config: dict[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_name)
        flat = {k: str(v)[:500] for k, v in config.items()}
        mlflow.log_params(flat)

    def log_scalars(self, step: int, scalars: dict[str, float], wall_time: float | None) -> None:
        ts = int(wall_time * 1000) if wall_time is not None else None
        for tag, value in scalars.items():
            self.mlflow.log_metric(tag, value, step=step, timestamp=ts)

    def close(self) -> None:
        self.mlflow.end_run()
