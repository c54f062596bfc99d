"""The one training loop: pretraining, distillation and fine-tuning all run through :func:`run`.

It owns the DeepSpeed engine, the learning-rate schedule, the world-size-independent batch order,
logging (TensorBoard + JSONL), linearity tracking, validation, checkpoints with exact resume, the NaN
guard and the Hugging Face export. What is trained comes from an objective (``linreg.train.objectives``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from linreg import checkpoint as ckpt
from linreg.config import to_dict
from linreg.errors import CheckpointError, ConfigError, LinregError
from linreg.recipe import Recipe, resolve_path
from linreg.tracking import RunLogger, linearity_table

FAULT_NAN_AT_STEP = "LINREG_FAULT_NAN_AT_STEP"  # tests: make the loss of this step NaN
FAULT_KILL_AFTER_STEP = "LINREG_FAULT_KILL_AFTER_STEP"  # tests: SIGKILL this process after step N (and its save)
FAULT_KILL_DURING_SAVE = "LINREG_FAULT_KILL_DURING_SAVE"  # tests: SIGKILL in the save of step N, before the marker
TEST_STEP_DELAY = "LINREG_TEST_STEP_DELAY"  # tests: sleep this many seconds after every step (timing-free preemption)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteLossError(LinregError):
    """The loss became NaN or infinite; the run stops before those weights can be saved."""


@contextlib.contextmanager
def _killed_after_first_file(flush):
    """Tests (``LINREG_FAULT_KILL_DURING_SAVE``): SIGKILL this process as soon as DeepSpeed's save has
    written its first file, leaving a half-written checkpoint folder behind."""
    original = torch.save

    def save(*args, **kwargs):
        original(*args, **kwargs)
        flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save
    try:
        yield
    finally:
        torch.save = original


@dataclass
class RunResult:
    run_dir: Path
    final_step: int
    interrupted: bool = False
    losses: dict[int, float] = field(default_factory=dict)
    linearity: list[dict] | None = None
    hf_dir: Path | None = None
    resumed_from: int | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIST_TIMEOUT_ENV = "LINREG_DIST_TIMEOUT_MIN"
DEFAULT_DIST_TIMEOUT_MIN = 120.0


def dist_timeout(env=None) -> datetime.timedelta:
    """Timeout of the process group's collectives and barriers: ``LINREG_DIST_TIMEOUT_MIN`` minutes, else
    DeepSpeed's ``DEEPSPEED_TIMEOUT``, else 120. Long, because every other rank waits in a barrier while
    rank 0 prepares the data (hub download, BPE training, tokenization) or converts a checkpoint to the
    universal format; DeepSpeed's own default of 10 minutes is far too short for a cold first run."""
    env = os.environ if env is None else env
    for key in (DIST_TIMEOUT_ENV, "DEEPSPEED_TIMEOUT"):
        raw = env.get(key)
        if raw in (None, ""):
            continue
        try:
            minutes = float(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected a number of minutes") from None
        if not minutes > 0 or math.isinf(minutes):
            raise ConfigError(f"{key}={raw!r}: must be a positive number of minutes")
        return datetime.timedelta(minutes=minutes)
    return datetime.timedelta(minutes=DEFAULT_DIST_TIMEOUT_MIN)


def local_device_index(env, device_count: int) -> int | None:
    """Accelerator index of this process: ``LOCAL_RANK`` (what the launcher sets per node), or None when
    the machine has no accelerator device (CPU ranks)."""
    if device_count <= 0:
        return None
    raw = env.get("LOCAL_RANK", "0")
    try:
        index = int(raw)
    except ValueError:
        raise ConfigError(f"LOCAL_RANK={raw!r} is not an integer") from None
    if index < 0:
        raise ConfigError(f"LOCAL_RANK={index} is negative")
    if index >= device_count:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(
            f"LOCAL_RANK={index} but this process sees only {device_count} device(s)"
            f"{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}: start at most "
            f"{device_count} rank(s) per node, each seeing all of the node's devices")
    return index


def local_device() -> torch.device:
    """The device of this rank: accelerator ``LOCAL_RANK``, made the current device (DeepSpeed puts the
    model there too), or the CPU."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    index = local_device_index(os.environ, acc.device_count())
    if index is None:
        return torch.device(acc.current_device_name())
    acc.set_device(index)
    return torch.device(acc.device_name(index))


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed; a plain ``python`` start becomes a 1-rank world.

    The rank's accelerator device (``LOCAL_RANK``) is made current first, so that NCCL and every
    ``torch.cuda`` call of this process use the device DeepSpeed puts the model on."""
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port()))})
    timeout = dist_timeout()
    local_device()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_init_required=True, verbose=False, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:  # step = number of optimizer steps already taken
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return min_ratio + (1 - min_ratio) * (1 - progress)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(params, recipe: Recipe, ds_cfg: dict, device: torch.device):
    from linreg.dsconfig import offloads_optimizer

    o = recipe.optimizer
    decay, no_decay = [], []
    for p in params:
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if offloads_optimizer(ds_cfg):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **kw)


def _world_batches(objective, recipe: Recipe, step: int, rank: int, world: int, accum: int):
    """Micro batches of this rank for optimizer step ``step`` (0-based): the global batch is the same
    whatever the world size; rank r takes the r-th contiguous slice, split into ``accum`` micro batches."""
    from linreg.data.loader import global_batch_indices, rank_slice

    idx = global_batch_indices(objective.num_train_examples(), recipe.train.global_batch_size, step,
                               recipe.train.seed)
    mine = rank_slice(idx, rank, world)
    mb = recipe.train.micro_batch_size
    return [mine[i * mb:(i + 1) * mb] for i in range(accum)]


class Trainer:
    def __init__(self, recipe: Recipe, resume: str | None = "auto", log_stream=None):
        self.recipe = recipe
        self.resume_arg = resume
        self.run_dir = recipe.run_dir
        self.ckpt_root = self.run_dir / "checkpoints"
        self._out = log_stream or sys.stdout

    # -- small helpers -----------------------------------------------------------------------------
    def log(self, msg: str, all_ranks: bool = False) -> None:
        if all_ranks or self.rank == 0:
            prefix = f"[rank {self.rank}] " if all_ranks else ""
            print(f"{prefix}{msg}", file=self._out, flush=True)

    def barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()

    def _all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(t)
            t /= self.world
        return t

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        import deepspeed

        from linreg.dsconfig import fill_ds_config, load_ds_config, resolve_precision, zero_stage
        from linreg.train.objectives import RunContext, objective_class

        r = self.recipe
        self.rank, self.world = init_distributed()
        self.device = local_device()  # accelerator LOCAL_RANK (current device from here on), or the CPU
        precision = resolve_precision(r.train.precision, self.device.type)
        if precision != "fp32" and self.device.type == "cpu":
            raise ConfigError(f"train.precision={precision} needs a GPU; use fp32 (or auto) on CPU")
        ds_path = resolve_path(r.train.deepspeed_config, "train.deepspeed_config")
        self.ds_cfg = fill_ds_config(load_ds_config(ds_path), global_batch=r.train.global_batch_size,
                                     micro_batch=r.train.micro_batch_size, world_size=self.world,
                                     grad_clip=r.train.grad_clip, precision=precision, source=str(ds_path))
        self.accum = self.ds_cfg["gradient_accumulation_steps"]
        self.precision = precision

        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.barrier()
        self.resume = ckpt.resolve_resume(self.resume_arg, self.ckpt_root, log=self.log)
        # a fresh start, or an explicit older --resume, below an earlier run's checkpoints is refused
        ckpt.refuse_newer_checkpoints(self.ckpt_root, self.resume[0] if self.resume is not None else 0)
        if self.resume is not None:
            self._maybe_universal(self.resume)

        from linreg.regularizers import build_regularizer

        self.regularizer = build_regularizer(r.regularizer.name, r.regularizer.weight, r.regularizer.layers,
                                             **r.regularizer.options)
        ctx = RunContext(recipe=r, run_dir=self.run_dir, rank=self.rank, world_size=self.world, device=self.device,
                         barrier=self.barrier, log=self.log)
        self.objective = objective_class(r.task.kind)(ctx)
        self.objective.prepare()
        model = self.objective.build_model()
        from linreg.model import count_parameters

        self.param_counts = count_parameters(model)
        self.log(f"model: {self.param_counts['total'] / 1e6:.2f}M parameters "
                 f"({self.param_counts['non_embedding'] / 1e6:.2f}M without embeddings), "
                 f"ZeRO stage {zero_stage(self.ds_cfg)}, {precision}, {self.world} rank(s), "
                 f"global batch {r.train.global_batch_size} = {r.train.micro_batch_size} x {self.world} x "
                 f"{self.accum} accumulation")

        params = self.objective.trainable_parameters(model)
        optimizer = build_optimizer(params, r, self.ds_cfg, self.device)
        sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(r.optimizer.schedule, r.optimizer.warmup_steps, r.train.steps,
                                 r.optimizer.min_lr_ratio))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=sched, config=self.ds_cfg,
            model_parameters=params)
        self.objective.on_engine_ready(self.engine)
        self.model = self.engine.module

        self.start_step = 0
        if self.resume is not None:
            self._load(*self.resume)

        self.logger = RunLogger(self.run_dir, enabled=self.rank == 0,
                                resume_step=self.start_step if self.resume is not None else None)
        if self.rank == 0:
            (self.run_dir / "recipe.yaml").write_text(_yaml(to_dict(r)))
            (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_cfg, indent=2))

        from linreg.model import flops_per_token, peak_flops_per_device

        cfg = self.objective.model_config()
        self.flops_per_token = None
        if cfg is not None:
            self.flops_per_token = flops_per_token(cfg, r.train.seq_len, counts=self.param_counts)
            if self.flops_per_token is None:
                self.log(f"MFU not logged: no FLOPs-per-token count for model type "
                         f"{getattr(cfg, 'model_type', type(cfg).__name__)!r}")
        self.peak_flops = peak_flops_per_device(r.train.peak_tflops)

    def _maybe_universal(self, resume: tuple[int, Path]) -> None:
        """Resuming on a different number of ranks: convert the ZeRO checkpoint to DeepSpeed's universal
        format once (rank 0) and load that."""
        step, path = resume
        info = json.loads((path / ckpt.MARKER).read_text())
        saved_world = info.get("world_size", self.world)
        if saved_world == self.world:
            return
        from linreg.universal import convert_to_universal

        uni = path.parent / f"{path.name}_universal"
        if self.rank == 0:
            self.log(f"checkpoint {path.name} was written by {saved_world} rank(s), this run has {self.world}: "
                     f"converting it to a universal checkpoint in {uni}")
            convert_to_universal(path, uni)
        self.barrier()
        self.ds_cfg.setdefault("checkpoint", {})["load_universal"] = True
        self.universal_dir = uni

    def _load(self, step: int, path: Path) -> None:
        uni = getattr(self, "universal_dir", None)
        load_dir, tag = (uni.parent, uni.name) if uni is not None else (path.parent, path.name)
        with ckpt.safe_torch_load():
            loaded, client = self.engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
        if client.get("step") != step:
            raise CheckpointError(f"checkpoint {path} holds step {client.get('step')}, expected {step}")
        rng = client.get("rng", {}).get(str(self.rank))
        if rng is not None:
            ckpt.set_rng_state(rng)
        self.start_step = step
        self.log(f"resumed from step {step} ({path})")

    # -- the loop ------------------------------------------------------------------------------------
    def _install_stop_handlers(self) -> None:
        """SIGTERM / SIGUSR1 (SLURM preemption, time limit, scancel) finish the current step, save a
        checkpoint and exit, so a requeued job loses nothing."""
        self._stop_signal = 0

        def handler(signum, frame):
            self._stop_signal = signum

        self._old_handlers = {}
        for sig in STOP_SIGNALS:
            try:
                self._old_handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass

    def _restore_handlers(self) -> None:
        for sig, old in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, old)

    def _stop_requested(self) -> int:
        import torch.distributed as dist

        flag = torch.tensor([float(self._stop_signal)], device=self.device)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def train(self) -> RunResult:
        self._install_stop_handlers()
        try:
            return self._train()
        finally:
            self._restore_handlers()

    def _train(self) -> RunResult:
        r = self.recipe
        result = RunResult(run_dir=self.run_dir, final_step=self.start_step,
                           resumed_from=self.start_step if self.resume is not None else None)
        if self.start_step == 0 and r.track.enabled and r.track.at_start:
            result.linearity = self.track(0)
        nan_at = int(os.environ.get(FAULT_NAN_AT_STEP, -1))
        kill_after = int(os.environ.get(FAULT_KILL_AFTER_STEP, -1))
        step_delay = float(os.environ.get(TEST_STEP_DELAY, 0))
        window = {"time": 0.0, "steps": 0, "parts": {}}
        pbar = None
        if self.rank == 0:
            from tqdm.auto import tqdm

            pbar = tqdm(total=r.train.steps, initial=self.start_step, desc="train", unit="step",
                        file=self._out, dynamic_ncols=True, mininterval=2.0)
        for step in range(self.start_step, r.train.steps):
            t0 = time.perf_counter()
            window["lr"] = float(self.scheduler.get_last_lr()[0])  # the lr of this step (before the scheduler steps)
            parts_sum: dict[str, torch.Tensor] = {}
            for micro in _world_batches(self.objective, r, step, self.rank, self.world, self.accum):
                batch = {k: v.to(self.device) for k, v in self.objective.collate(micro).items()}
                loss, parts = self.objective.loss(self.engine, batch, self.regularizer)
                if step + 1 == nan_at:
                    loss = loss * float("nan")
                self._check_finite(loss, parts, step + 1)
                self.engine.backward(loss)
                self.engine.step()
                for k, v in (("loss/total", loss), *parts.items()):
                    parts_sum[k] = parts_sum.get(k, 0.0) + v.detach().float()
            done = step + 1
            dt = time.perf_counter() - t0
            if step_delay:
                time.sleep(step_delay)
            window["time"] += dt
            window["steps"] += 1
            for k, v in parts_sum.items():
                window["parts"][k] = window["parts"].get(k, 0.0) + v / self.accum
            if done % r.train.log_every == 0 or done == r.train.steps:
                vals = self._log_window(done, window)
                result.losses[done] = vals["loss/total"]
                if pbar is not None:
                    pbar.set_postfix(loss=f"{vals['loss/total']:.4f}", refresh=False)
                window = {"time": 0.0, "steps": 0, "parts": {}}
            if pbar is not None:
                pbar.update(1)
            if done % r.train.eval_every == 0 or done == r.train.steps:
                ev = self.objective.evaluate(self.engine.module)
                if ev:
                    self.logger.scalars(done, ev)
            if r.track.enabled and (done % r.track.every == 0 or done == r.train.steps):
                result.linearity = self.track(done)
            stop = self._stop_requested() if done < r.train.steps else 0
            if done % r.checkpoint.save_every == 0 or done == r.train.steps or stop:
                self.save(done)
            if stop:
                result.final_step, result.interrupted = done, True
                self.logger.close()
                self.log(f"stopped by signal {signal.Signals(stop).name} after step {done}; checkpoint saved, "
                         f"continue with --resume auto")
                if pbar is not None:
                    pbar.close()
                return result
            if done == kill_after:
                self.logger.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            result.final_step = done
        if pbar is not None:
            pbar.close()
        if r.checkpoint.export_hf:
            result.hf_dir = self.export()
        if result.linearity is None and r.track.enabled:
            result.linearity = self.track(result.final_step)
        self.logger.close()
        self._summary(result)
        return result

    def _check_finite(self, loss, parts, step: int) -> None:
        import torch.distributed as dist

        ok = torch.tensor([1.0 if torch.isfinite(loss.detach()).all() else 0.0], device=self.device)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() < 1:
            desc = ", ".join(f"{k}={v.detach().float().item():.4g}" for k, v in parts.items())
            last = ckpt.latest_complete(self.ckpt_root, log=lambda *_: None)
            where = f"the newest complete checkpoint is {last[1]}" if last else "no checkpoint was written yet"
            self.logger.flush()
            raise NonFiniteLossError(
                f"non-finite loss at step {step} ({desc or 'loss=' + str(loss.detach().float().item())}); "
                f"stopping before these weights are used or saved; {where}. Lower the learning rate, check "
                f"the data, or resume with --resume auto")

    def _log_window(self, step: int, window: dict) -> dict[str, float]:
        names = sorted(window["parts"])
        t = torch.stack([window["parts"][k] / window["steps"] for k in names]).to(self.device)
        t = self._all_reduce_mean(t)
        vals = {k: float(v) for k, v in zip(names, t.tolist())}
        step_time = window["time"] / window["steps"]
        tokens = self.recipe.train.global_batch_size * self.objective.tokens_per_example()
        vals["train/lr"] = window["lr"]  # used by the window's last step
        gn = self.engine.get_global_grad_norm()
        if gn is not None:
            vals["train/grad_norm"] = float(gn)
        vals["perf/step_time_s"] = step_time
        if tokens:
            vals["perf/tokens_per_s"] = tokens / step_time
            if self.flops_per_token and self.peak_flops:
                vals["perf/mfu"] = self.flops_per_token * tokens / step_time / (self.peak_flops * self.world)
        self.logger.scalars(step, vals)
        return vals

    @torch.no_grad()
    def track(self, step: int) -> list[dict] | None:
        from linreg.hidden import measure_model

        batches = self.objective.tracking_batches()
        if not batches:
            return None
        model = self.engine.module
        was = model.training
        model.eval()
        batches = [{k: v.to(self.device) for k, v in b.items()} for b in batches]
        res = measure_model(model, batches, distributed=self.world > 1, progress=False)
        model.train(was)
        layers = [layer.to_dict() for layer in res.layers]
        meta = {"n_tokens": res.layers[0].n_tokens if res.layers else 0,
                "baseline": res.layers[0].baseline if res.layers else None}
        self.logger.linearity(step, layers, meta)
        return layers

    def save(self, step: int) -> None:
        client = {"step": step, "rng": {str(self.rank): ckpt.rng_state()}, "world_size": self.world}
        # every rank's RNG state travels in its own client state copy; gather them so any rank can resume
        import torch.distributed as dist

        if dist.is_initialized() and self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, client["rng"][str(self.rank)])
            client["rng"] = {str(i): g for i, g in enumerate(gathered)}
        path = ckpt.step_dir(self.ckpt_root, step)
        if self.rank == 0 and (path.exists() or ckpt.universal_dir(path).exists()):
            # an earlier save of this step (cut short before a resume): never write into it, its marker
            # or another world size's partition files would survive
            self.log(f"removing the earlier {path.name} before saving over it")
            ckpt.remove_checkpoint(path)
        self.barrier()
        fault = int(os.environ.get(FAULT_KILL_DURING_SAVE, -1)) == step and self.rank == 0
        with _killed_after_first_file(self.logger.flush) if fault else contextlib.nullcontext():
            self.engine.save_checkpoint(str(self.ckpt_root), tag=path.name, client_state=client)
        self.barrier()
        if self.rank == 0:
            ckpt.mark_complete(path, step, {"world_size": self.world, "zero_stage": self.ds_cfg.get(
                "zero_optimization", {}).get("stage", 0)})
            ckpt.remove_old(self.ckpt_root, self.recipe.checkpoint.keep_last, log=self.log)
            self.logger.flush()
        self.barrier()

    def export(self) -> Path:
        from linreg.dsconfig import zero_stage

        out = self.run_dir / "hf"
        model = self.engine.module
        if zero_stage(self.ds_cfg) == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
                if self.rank == 0:
                    self.objective.export(model, out)
        elif self.rank == 0:
            self.objective.export(model, out)
        self.barrier()
        return out

    def _summary(self, result: RunResult) -> None:
        if self.rank != 0:
            return
        lines = ["", f"run finished at step {result.final_step}: {self.run_dir}"]
        if result.linearity:
            lines += ["per-layer linearity on held-out tokens (block i: input -> output, before the final norm):",
                      linearity_table(result.linearity)]
        lines.append(f"TensorBoard: tensorboard --logdir {self.run_dir / 'tensorboard'}")
        if result.hf_dir:
            lines.append(f"Hugging Face export: {result.hf_dir} ({self.objective.export_hint()})")
        self.log("\n".join(lines))


def _yaml(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def run(recipe: Recipe, resume: str | None = "auto") -> RunResult:
    trainer = Trainer(recipe, resume=resume)
    trainer.setup()
    return trainer.train()
