"""The recipe schema: one YAML file per experiment, validated into these dataclasses.

Every value lives in exactly one place. Batch sizes, learning rate, clipping and precision are stated
here and written into the DeepSpeed JSON (whose matching keys must say ``"auto"``); the DeepSpeed file
only holds what is DeepSpeed's own business (ZeRO stage, offload, communication settings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from linreg.data.config import DataConfig, TokenizerConfig
from linreg.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ModelSection:
    """The network. ``config`` holds ``transformers.MistralConfig`` keyword arguments."""

    config: dict[str, Any] = field(default_factory=dict)
    # a Hugging Face folder or hub name to start from instead of random init; with task.kind lm and no
    # tokenizer.path, its own tokenizer is used (a newly trained BPE would number tokens differently)
    init_from: str | None = None
    attn_implementation: str = "sdpa"
    activation_checkpointing: bool = False

    def validate(self, path: str) -> None:
        from linreg.model import check_mistral_keys

        check_mistral_keys(self.config, f"{path}.config")


@dataclass
class OptimizerSection:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio at the last step

    def validate(self, path: str) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"{path}.betas: expected two numbers, got {self.betas}")
        if self.lr <= 0:
            raise ConfigError(f"{path}.lr: must be positive, got {self.lr}")


@dataclass
class TrainSection:
    steps: int = 100
    seq_len: int = 256
    global_batch_size: int = 32  # sequences per optimizer step over all ranks (fixed whatever the rank count)
    micro_batch_size: int = 8  # sequences per forward on one rank; gradient accumulation is derived
    seed: int = 1234
    deepspeed_config: str = "ds_configs/zero2.json"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPUs that have it, else fp32
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 100  # validation loss and perplexity
    eval_blocks: int = 32
    peak_tflops: float | None = None  # per device, for MFU; None: looked up from the GPU name

    def validate(self, path: str) -> None:
        for name in ("steps", "seq_len", "global_batch_size", "micro_batch_size", "log_every", "eval_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name}: must be positive, got {getattr(self, name)}")


@dataclass
class RegularizerSection:
    """Inter-layer loss added to the task loss: a registered name or a ``pkg.module:Class`` plugin."""

    name: str = "none"
    weight: float = 0.0
    layers: list[int] | None = None  # which consecutive pairs (block indices) take part; None: all
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        if self.name is not None and str(self.name).strip().lower() not in ("", "none"):
            from linreg.regularizers import build_regularizer

            # builds it once with its options: a wrong name, plugin path or option fails before any compute
            build_regularizer(self.name, weight=self.weight, layers=self.layers, **self.options)


@dataclass
class TrackSection:
    """Layer linearity measured during training on fixed held-out tokens."""

    enabled: bool = True
    every: int = 100
    blocks: int = 16  # validation blocks of seq_len tokens used for the measurement
    at_start: bool = True

    def validate(self, path: str) -> None:
        for name in ("every", "blocks"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name}: must be positive, got {getattr(self, name)} "
                                  f"(to switch tracking off set {path}.enabled=false)")


@dataclass
class CheckpointSection:
    save_every: int = 500
    keep_last: int = 2  # 0: keep every checkpoint
    export_hf: bool = True

    def validate(self, path: str) -> None:
        if self.save_every <= 0:
            raise ConfigError(f"{path}.save_every: must be positive, got {self.save_every}")
        if self.keep_last < 0:
            raise ConfigError(f"{path}.keep_last: must be >= 0 (0 keeps every checkpoint), got {self.keep_last}")


@dataclass
class TaskSection:
    """What is trained: ``lm`` (pretraining), ``distill`` and fine-tuning kinds register themselves."""

    kind: str = "lm"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    name: str = "run"
    output_dir: str = "runs/{name}"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainSection = field(default_factory=TrainSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    regularizer: RegularizerSection = field(default_factory=RegularizerSection)
    track: TrackSection = field(default_factory=TrackSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    task: TaskSection = field(default_factory=TaskSection)
    description: str = ""
    source: str | None = None  # the YAML file it came from (set by the loader)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))

    def validate(self, path: str) -> None:
        if self.task.kind == "lm" and self.model.init_from and self.tokenizer.path is None:
            # continued pretraining of a model: its embedding rows are indexed by its own tokenizer's ids
            self.tokenizer.path = self.model.init_from


def resolve_path(value: str | Path, what: str) -> Path:
    """A path from a recipe: absolute, relative to the working directory, or relative to the repo."""
    p = Path(value)
    if p.is_absolute() or p.exists():
        return p
    alt = REPO_ROOT / p
    if alt.exists():
        return alt
    raise ConfigError(f"{what}: file not found: {value} (looked in {Path.cwd()} and {REPO_ROOT})")
