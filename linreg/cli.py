"""The ``linreg`` console command.

Every subcommand lives in its own module and exposes ``main(argv: list[str] | None) -> int`` with its
own argparse parser, so ``linreg SUB --help`` documents every option of SUB. This file only maps names
to modules and imports the chosen one lazily (``linreg --help`` imports no torch).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line description). The module defines main(argv) -> int.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("linreg.train.cli", "Pretrain from a recipe (same as `deepspeed launch/pretrain.py`)."),
    "prepare-data": ("linreg.data.prepare", "Tokenize and pack a recipe's corpus into memory-mapped shards."),
    "submit": ("linreg.slurm", "Write and submit (or --dry-run print) a SLURM batch script for a recipe."),
    "analyze": ("linreg.analyze", "Linearity profile of any Hugging Face causal LM or of a run's checkpoints."),
    "prune": ("linreg.pruning.cli", "Remove the most linear blocks, optionally replacing them by fitted linear maps."),
    "probe": ("evals.linear_probe", "Linear probing of every layer (xstorycloze-en or your own data)."),
    "judge": ("evals.judge", "Grade story completions with an OpenAI-compatible model (TinyStories method)."),
    "superglue": ("evals.superglue", "SuperGLUE zero-shot through lm-evaluation-harness."),
    "compare": ("evals.compare", "Side-by-side table of several models' evaluation results."),
    "finetune-table": ("linreg.finetune.table", "Linearity change table (mean, std over seeds) of fine-tuning runs."),
}


def _parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<16} {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    p = argparse.ArgumentParser(
        prog="linreg",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Layer linearity of transformers: measure, pretrain with regularizers, evaluate, prune.",
        epilog="subcommands:\n" + "\n".join(lines) + "\n\nRun `linreg SUBCOMMAND --help` for its options.",
    )
    p.add_argument("--version", action="store_true", help="print the package version and exit")
    p.add_argument("subcommand", nargs="?", help="one of the subcommands listed below")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the subcommand")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if argv and argv[0] in SUBCOMMANDS:  # dispatch before argparse so `linreg SUB --help` reaches SUB
        return _run(parser, argv[0], argv[1:])
    ns = parser.parse_args(argv)
    if ns.version:
        from linreg import __version__

        print(__version__)
        return 0
    if ns.subcommand is None:
        parser.print_help()
        return 0
    if ns.subcommand not in SUBCOMMANDS:
        parser.error(f"unknown subcommand {ns.subcommand!r}; choose from: {', '.join(SUBCOMMANDS)}")
    return _run(parser, ns.subcommand, ns.args)


def _run(parser: argparse.ArgumentParser, name: str, args: list[str]) -> int:
    module_name, _ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:  # pragma: no cover - only when an optional part is missing
        if exc.name and module_name.startswith(exc.name):
            parser.error(f"subcommand {name!r} is not available in this installation ({exc})")
        raise
    rc = module.main(args)
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
