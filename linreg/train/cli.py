"""Command line of the training loop: ``deepspeed launch/pretrain.py --recipe R`` or ``linreg pretrain``."""

from __future__ import annotations

import argparse
import sys

from linreg.errors import LinregError

EPILOG = """\
overrides:
  --set takes SECTION.KEY=VALUE, the value parsed as YAML; repeat it for several keys, e.g.
    --set train.steps=50 --set optimizer.lr=3e-4 --set regularizer.name=cosine --set regularizer.layers=[0,1]
  Unknown keys and wrong types are refused before anything is computed.

environment:
  LINREG_DIST_TIMEOUT_MIN  minutes a rank waits in a barrier or collective (default: DEEPSPEED_TIMEOUT, else 120);
                           rank 0 prepares the data while the others wait; `linreg prepare-data --recipe R`
                           beforehand takes that out of the run

examples:
  deepspeed launch/pretrain.py --recipe recipes/tiny.yaml
  deepspeed --num_gpus 8 launch/pretrain.py --recipe recipes/mistral-150m-cosine.yaml --resume auto
  linreg pretrain --recipe recipes/tiny.yaml --set train.steps=20 --output-dir /tmp/run
"""


def build_parser(prog: str = "linreg pretrain", default_kind: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a model from a recipe with DeepSpeed ZeRO: "
                                "checkpoints, linearity tracking and TensorBoard logs in the run folder.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="recipe YAML (see recipes/ and README)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one recipe value (repeatable)")
    p.add_argument("--resume", default="auto", metavar="auto|none|DIR",
                   help="auto: continue from the newest complete checkpoint of the run folder, or start fresh "
                        "(default); none: start fresh; DIR: a checkpoints/step_N folder. none and DIR are refused "
                        "when the run folder holds complete checkpoints of later steps (an earlier run)")
    p.add_argument("--output-dir", default=None, help="run folder (overrides the recipe's output_dir)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the recipe, print it resolved with the parameter count, and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(default_kind=default_kind)
    return p


def _dry_run_parameters(recipe) -> str:
    """The parameter line of ``--dry-run`` for an lm recipe, without preparing data or building weights."""
    from pathlib import Path

    from linreg.model import count_parameters, mistral_config

    def line(n, note=""):
        return f"parameters: {n['total'] / 1e6:.1f}M total, {n['non_embedding'] / 1e6:.1f}M non-embedding{note}"

    if recipe.model.init_from:
        folder = Path(recipe.model.init_from).expanduser()
        if not (folder / "config.json").is_file():
            return f"parameters: not counted (model.init_from={recipe.model.init_from} is not a local model folder)"
        from transformers import AutoConfig

        return line(count_parameters(AutoConfig.from_pretrained(folder)), f" (model.init_from={folder})")
    if recipe.tokenizer.path is None:
        vocab = recipe.tokenizer.vocab_size
        note = f"the BPE to train, tokenizer.vocab_size={vocab}; it may come out smaller"
    elif Path(recipe.tokenizer.path).expanduser().is_dir():
        from linreg.data.tokenizer import load_tokenizer

        vocab = len(load_tokenizer(recipe.tokenizer.path))
        note = f"the {vocab} tokens of tokenizer.path"
    else:
        vocab = recipe.tokenizer.vocab_size
        note = (f"assumes tokenizer.vocab_size={vocab}: the tokenizer of tokenizer.path={recipe.tokenizer.path} "
                f"is not fetched by --dry-run")
    if "vocab_size" in recipe.model.config:  # pinned: must hold the tokenizer (mistral_config checks)
        note = f"model.config.vocab_size={recipe.model.config['vocab_size']}; tokenizer: {note}"
    return line(count_parameters(mistral_config(recipe.model.config, vocab, recipe.train.seq_len)),
                f" (vocabulary: {note})")


def main(argv: list[str] | None = None, prog: str = "linreg pretrain", default_kind: str | None = None) -> int:
    args = build_parser(prog, default_kind).parse_args(argv)
    try:
        from linreg.config import load_recipe, to_dict

        overrides = list(args.overrides)
        if args.output_dir:
            overrides.append(f"output_dir={args.output_dir}")
        recipe = load_recipe(args.recipe, overrides)
        if default_kind and recipe.task.kind != default_kind:
            raise LinregError(f"{prog} runs task.kind={default_kind!r} recipes; {args.recipe} has "
                              f"{recipe.task.kind!r}")
        if args.dry_run:
            import yaml

            print(yaml.safe_dump(to_dict(recipe), sort_keys=False))
            if recipe.task.kind == "lm":
                print(_dry_run_parameters(recipe))
            return 0
        from linreg.train import run

        result = run(recipe, resume=args.resume)
        return 143 if result.interrupted else 0
    except LinregError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
