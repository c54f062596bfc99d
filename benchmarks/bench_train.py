"""Overhead of the training loop against a bare PyTorch loop, side by side in one process (CPU or GPU).

Variants, each timed over the same steps of the same recipe, alternating to share machine noise:
  bare        plain PyTorch: model, AdamW, LambdaLR schedule, clipping, the same batches; nothing else
  loop        the full linreg loop through DeepSpeed (logging, validation off, checkpoints off)
  loop+reg    the same with the cosine regularizer (weight 0.5) on every block pair
  loop+track  the loop with linearity tracking at the recipe's default interval (track.every)

Reports each variant's time per step as a ratio to the bare loop, and the tracking share of the run.
    python benchmarks/bench_train.py [--recipe recipes/tiny.yaml] [--steps 100] [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _recipe(path: str, out: Path, steps: int, sets: list[str]):
    from linreg.config import load_recipe

    base = [f"output_dir={out}", f"train.steps={steps}", f"checkpoint.save_every={10**9}",
            "checkpoint.export_hf=false", f"train.eval_every={10**9}", "track.at_start=false"]
    return load_recipe(path, base + sets)


def time_loop(recipe_path: str, out: Path, steps: int, sets: list[str]) -> tuple[float, float]:
    """Seconds per step of the full loop, and the seconds spent in linearity tracking."""
    from linreg.train.loop import Trainer

    recipe = _recipe(recipe_path, out, steps, sets)
    trainer = Trainer(recipe, resume="none", log_stream=open(os.devnull, "w"))
    trainer.setup()
    track_time = [0.0]
    original = trainer.track

    def timed_track(step):
        t = time.perf_counter()
        r = original(step)
        track_time[0] += time.perf_counter() - t
        return r

    trainer.track = timed_track
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    return total / steps, track_time[0]


def time_bare(recipe_path: str, out: Path, steps: int) -> float:
    from linreg.data.loader import global_batch_indices
    from linreg.train.loop import Trainer, lr_lambda

    recipe = _recipe(recipe_path, out, steps, ["track.enabled=false"])
    trainer = Trainer(recipe, resume="none", log_stream=open(os.devnull, "w"))
    trainer.setup()  # for the identical model init and data; the engine is not used below
    obj = trainer.objective
    model = obj.build_model().to(trainer.device)
    o = recipe.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            weight_decay=o.weight_decay, fused=trainer.device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.schedule, o.warmup_steps, steps, o.min_lr_ratio))
    mb, g = recipe.train.micro_batch_size, recipe.train.global_batch_size
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = global_batch_indices(obj.num_train_examples(), g, step, recipe.train.seed)
        for i in range(0, g, mb):
            batch = {k: v.to(trainer.device) for k, v in obj.collate(idx[i:i + mb]).items()}
            loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss / (g // mb)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    float(loss.detach())  # wait for the device
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(REPO / "recipes" / "tiny.yaml"), help="recipe to time")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per timed run")
    p.add_argument("--repeats", type=int, default=2, help="alternating repetitions of every variant")
    p.add_argument("--quick", action="store_true", help="20 steps, 1 repeat (a smoke run)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for the JSON result")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 20, 1
    from linreg.train.loop import init_distributed

    init_distributed()
    scratch = Path(args.out) / "bench_train_runs"
    from linreg.config import load_recipe

    every = load_recipe(args.recipe).track.every
    times: dict[str, list[float]] = {k: [] for k in ("bare", "loop", "loop+reg", "loop+track")}
    track_s: list[float] = []
    # warm-up: first-touch allocations and lazy imports out of the timed runs
    time_bare(args.recipe, scratch / "bare", 3)
    time_loop(args.recipe, scratch / "loop", 3, ["track.enabled=false"])
    for rep in range(args.repeats):
        times["bare"].append(time_bare(args.recipe, scratch / "bare", args.steps))
        times["loop"].append(time_loop(args.recipe, scratch / "loop", args.steps, ["track.enabled=false"])[0])
        times["loop+reg"].append(time_loop(args.recipe, scratch / "reg", args.steps,
                                           ["track.enabled=false", "regularizer.name=cosine",
                                            "regularizer.weight=0.5"])[0])
        per_step, tr = time_loop(args.recipe, scratch / "track", args.steps, [])
        times["loop+track"].append(per_step)
        track_s.append(tr / (per_step * args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        ("bare PyTorch loop", med["bare"], 1.0),
        ("linreg loop (DeepSpeed, logging)", med["loop"], med["loop"] / med["bare"]),
        ("+ cosine regularizer", med["loop+reg"], med["loop+reg"] / med["bare"]),
        (f"+ linearity tracking every {every} steps", med["loop+track"], med["loop+track"] / med["bare"]),
    ]
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    print(f"\n{Path(args.recipe).name}, {args.steps} steps x {args.repeats} repeats, {device}, torch {torch.__version__}\n")
    print("| variant | s/step | ratio to bare |")
    print("|---|---:|---:|")
    for name, t, r in rows:
        print(f"| {name} | {t:.4f} | {r:.3f} |")
    share = statistics.median(track_s)
    reg_cost = med["loop+reg"] / med["loop"] - 1
    print(f"\nregularizer cost vs loop: {reg_cost * 100:+.1f}%   tracking share of run time: {share * 100:.1f}%")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    res = {"recipe": args.recipe, "steps": args.steps, "repeats": args.repeats, "device": device,
           "seconds_per_step": times, "median": med, "regularizer_cost": reg_cost, "tracking_share": share}
    (Path(args.out) / "bench_train.json").write_text(json.dumps(res, indent=2))
    return 0 if all(math.isfinite(v) for v in med.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
