"""Command line of fine-tuning: one run, or several seeds one after another, then the table.

``deepspeed launch/finetune.py --recipe R [--seeds 1,2,3]``. Without ``--seeds`` this is the training
loop's command line for ``classification`` / ``reward`` recipes (run folder = the recipe's output_dir).
With ``--seeds`` every seed is a full run of the same loop in ``<output_dir>/seed_<s>`` (the recipe with
``train.seed=s``), and ``<output_dir>/finetune_table.{md,json,png}`` is written at the end.

The seeds run in the same processes, one after the other: torch.distributed is initialised once by
the first run and its process group is reused by the next ones (each builds a fresh model, optimizer
and DeepSpeed engine; the previous ones are released and garbage collected in between). A seed whose
run already finished (``finetune.json`` says so, at ``train.steps``) is skipped, so re-running an
interrupted sweep continues where it stopped (``--resume auto`` also resumes the interrupted seed from
its newest checkpoint), and raising ``train.steps`` continues finished seeds from their last checkpoint.

SIGTERM / SIGUSR1 (SLURM preemption, time limit) make the training loop save a checkpoint and return
early: that run stays ``finished: false``, the sweep starts no further seed and writes no table, and the
command exits 143 (as ``linreg pretrain`` does), so running it again continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from linreg.errors import ConfigError, LinregError

FINETUNE_KINDS = ("classification", "reward")
STOPPED_EXIT = 143  # stopped by SIGTERM/SIGUSR1 after saving a checkpoint (as the training loop's command line)

EPILOG = """\
overrides:
  --set takes SECTION.KEY=VALUE, the value parsed as YAML; repeat it for several keys, e.g.
    --set train.steps=200 --set optimizer.lr=1e-5 --set model.init_from=runs/mistral-150m/hf
    --set task.options.max_train_examples=2000
  Unknown keys and wrong types are refused before anything is computed.

examples:
  deepspeed launch/finetune.py --recipe recipes/finetune-tiny-classification.yaml --seeds 1,2
  deepspeed --num_gpus 8 launch/finetune.py --recipe recipes/finetune-boolq.yaml --seeds 1,2,3
  python launch/finetune.py --recipe recipes/finetune-hh-reward.yaml --set model.init_from=EleutherAI/pythia-410m
  linreg finetune-table runs/finetune-boolq runs/finetune-cb     # one table for several sweeps

exit status:
  0 done; 2 bad recipe, options or data (error: ...); 143 stopped by SIGTERM/SIGUSR1 after saving a
  checkpoint (a sweep starts no further seed and writes no table): run the same command again to continue
"""


def build_parser(prog: str = "launch/finetune.py") -> argparse.ArgumentParser:
    from linreg.train.cli import build_parser as loop_parser

    p = loop_parser(prog)
    p.description = ("Fine-tune a causal LM with a classification or reward head from a recipe "
                     "(task.kind classification|reward) through the training loop, tracking layer linearity "
                     "before, during and after; with --seeds, several seeds and the linearity-change table.")
    p.epilog = EPILOG
    for action in p._actions:
        if action.dest == "dry_run":
            action.help = ("validate the recipe and task.options, print the resolved recipe (and the seed "
                           "folders), and exit without reading data")
    p.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="run these train.seed values one after another in <output_dir>/seed_<s>, then write "
                        "<output_dir>/finetune_table.{md,json,png} (mean ± std over the seeds)")
    return p


def parse_seeds(text: str | None) -> list[int]:
    if text is None:
        return []
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds: no seed given")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: repeated seed in {text!r}")
    return seeds


def _info_path(run_dir: Path) -> Path:
    from linreg.finetune.objectives import FINETUNE_INFO

    return run_dir / FINETUNE_INFO


def is_finished(recipe) -> bool:
    p = _info_path(recipe.run_dir)
    if not p.is_file() or not (recipe.run_dir / "linearity.jsonl").is_file():
        return False
    try:
        info = json.loads(p.read_text())
    except json.JSONDecodeError:
        return False
    return bool(info.get("finished")) and info.get("final_step") == recipe.train.steps


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def run_completed(recipe, result) -> bool:
    """Whether ``result`` (a :class:`linreg.train.loop.RunResult`) ends the run: not stopped by a signal and
    at ``train.steps``."""
    return not result.interrupted and result.final_step == recipe.train.steps


def finish_run(recipe, result) -> str | None:
    """Rank 0: record the end of the run in finetune.json and return a one-line report.

    A completed run (:func:`run_completed`) is marked ``finished`` with its final validation metrics and
    linearity means, and the line summarizes the linearity change. A run stopped early (SIGTERM/SIGUSR1:
    the loop saved a checkpoint and returned) stays ``finished: false`` and the line says how to continue."""
    if _rank() != 0:
        return None
    from linreg.finetune.table import read_run, strict_json

    from linreg.errors import DataError

    run_dir = recipe.run_dir
    p = _info_path(run_dir)
    info = json.loads(p.read_text()) if p.is_file() else {}
    done = run_completed(recipe, result)
    info.update({"finished": done, "final_step": result.final_step})
    p.write_text(strict_json(info, indent=2) + "\n")
    if not done:
        why = "stopped by a signal" if result.interrupted else "stopped early"
        return (f"{run_dir}: {why} after step {result.final_step} of {recipe.train.steps} (checkpoint saved; not "
                f"marked finished); run the same command again with --resume auto (the default) to continue")
    try:
        summary = read_run(run_dir)
    except DataError as exc:  # tracking off (track.enabled / track.at_start false)
        return f"{run_dir}: finished; no linearity change to report ({exc})"
    info.update({"val": summary.val, "linearity_before": summary.before, "linearity_after": summary.after})
    p.write_text(strict_json(info, indent=2) + "\n")
    b, a = summary.before, summary.after
    return (f"{summary.model} / {summary.task} seed {summary.seed}: linearity (mean over blocks) "
            f"{b['linearity']:.4f} -> {a['linearity']:.4f} ({a['linearity'] - b['linearity']:+.4f}); "
            f"without residual {b['linearity_wo_residual']:.4f} -> {a['linearity_wo_residual']:.4f} "
            f"({a['linearity_wo_residual'] - b['linearity_wo_residual']:+.4f})"
            + "".join(f"; {k} {v:.4f}" for k, v in sorted(summary.val.items()) if k in ("val/accuracy", "val/f1")))


def main(argv: list[str] | None = None, prog: str = "launch/finetune.py") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        from linreg.config import from_dict, load_recipe, to_dict
        from linreg.finetune.tasks import FinetuneOptions

        seeds = parse_seeds(args.seeds)
        overrides = list(args.overrides)
        if args.output_dir:
            overrides.append(f"output_dir={args.output_dir}")
        recipe = load_recipe(args.recipe, overrides)
        if recipe.task.kind not in FINETUNE_KINDS:
            raise ConfigError(f"{prog} runs task.kind {' or '.join(FINETUNE_KINDS)} recipes; {args.recipe} has "
                              f"{recipe.task.kind!r} (use launch/pretrain.py)")
        from_dict(FinetuneOptions, recipe.task.options, "task.options")  # refuse bad options before any compute
        if seeds and not (recipe.track.enabled and recipe.track.at_start):
            raise ConfigError("--seeds writes the linearity-change table: it needs track.enabled and "
                              "track.at_start (the step-0 measurement before fine-tuning)")
        if seeds and args.resume not in ("auto", "none"):
            raise ConfigError("--resume DIR names the checkpoint of one run; with --seeds use auto or none")
        base_dir = recipe.run_dir
        if args.dry_run:
            import yaml

            print(yaml.safe_dump(to_dict(recipe), sort_keys=False))
            if seeds:
                print("seeds: " + ", ".join(f"{s} -> {base_dir / f'seed_{s}'}" for s in seeds))
            return 0

        from linreg.model import release_memory
        from linreg.train import run

        if not seeds:
            result = run(recipe, resume=args.resume)
            line = finish_run(recipe, result)
            if line:
                print(line, flush=True)
            return 0 if run_completed(recipe, result) else STOPPED_EXIT

        run_dirs, lines = [], []
        for s in seeds:
            rs = load_recipe(args.recipe, overrides + [f"train.seed={s}"])
            rs.output_dir = str(base_dir / f"seed_{s}")
            run_dirs.append(rs.run_dir)
            if is_finished(rs):
                if _rank() == 0:
                    print(f"seed {s}: {rs.run_dir} already finished; skipped (use a new --output-dir to run "
                          f"it again)", flush=True)
                continue
            if _rank() == 0:
                print(f"=== seed {s} ({seeds.index(s) + 1}/{len(seeds)}): {rs.run_dir}", flush=True)
            result = run(rs, resume=args.resume)
            line = finish_run(rs, result)
            if line:
                lines.append(line)
                print(line, flush=True)
            if not run_completed(rs, result):  # preempted: stop here, the rerun continues this seed
                rest = seeds[seeds.index(s) + 1:]
                if _rank() == 0:
                    print(f"sweep stopped at seed {s}" + (f"; seeds {','.join(map(str, rest))} not started"
                                                           if rest else "")
                          + "; no table written. Run the same command again (--resume auto, the default) to "
                            "continue", flush=True)
                return STOPPED_EXIT
            del result
            release_memory()
            _barrier()
        if _rank() == 0:
            from linreg.finetune.table import write_table

            res = write_table(run_dirs, base_dir, strict=True)
            print("\n" + res["markdown"], flush=True)
            print("table: " + ", ".join(str(p) for p in res["paths"].values()), flush=True)
        _barrier()
        return 0
    except LinregError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
