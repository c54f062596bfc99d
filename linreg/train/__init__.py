"""The training loop shared by pretraining, distillation and fine-tuning."""

from linreg.train.loop import RunResult, Trainer, run

__all__ = ["RunResult", "Trainer", "run"]
