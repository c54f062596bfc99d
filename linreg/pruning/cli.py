"""``linreg prune``: remove the most linear (or least influential) blocks of a causal LM, optionally replacing
them by fitted linear maps; or sweep the number of removed blocks and plot perplexity against it.

Single cut::

    linreg prune --model runs/mistral-150m/hf --data hf:roneneldan/TinyStories --split validation \\
        --remove 4 --select linearity --replace linear --out pruned/m150-lin4

writes the pruned model folder ``DIR`` (weights, config, tokenizer, ``linreg_pruning.json``) and
``DIR/prune.json``: which blocks went, their scores, and perplexity on held-out tokens before and after
(for ``--replace linear`` also with the same blocks simply removed).

Sweep (the paper's pruning figure)::

    linreg prune --model runs/mistral-150m/hf --data ... --sweep 0,1,2,4,6,8 --out pruned/sweep \\
        [--distill-recipe recipes/distill-mistral-150m.yaml --distill-launcher "deepspeed --num_gpus 8"]

writes ``DIR/sweep.json`` and ``DIR/pruning.png``: perplexity against the number of cut blocks for plain
removal and for linear replacement, and with ``--distill-recipe`` for linear replacement followed by
distillation (each replaced model is saved to ``DIR/k<K>/replaced`` and distilled into ``DIR/k<K>/distill``
through the training loop; the distilled export is evaluated on the same held-out tokens).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from linreg.errors import ConfigError, DataError, LinregError

SELECT_CHOICES = ("linearity", "cosine", "angular", "angular1", "last", "given")  # linreg.pruning.select.SCORES

EPILOG = """\
calibration and evaluation tokens:
  --data is read once: the first --max-tokens tokens calibrate (scores and least-squares fits), the next
  --eval-tokens measure perplexity (or --eval-data names other text). The two never overlap.

selection (--select):
  linearity  most linear blocks first (--metric linearity_wo_residual scores the residual contribution instead)
  cosine     lowest ShortGPT block influence 1 - E[cos(x_in, x_out)] first
  angular    Gromov et al.: the contiguous run of K blocks l..l+K-1 whose input (of block l) and output (of
             block l+K-1) are closest in mean angular distance E[arccos(cos)]/pi over all tokens (the paper
             uses the last token of each sequence); a sweep picks the best run for each K separately.
             Not with --iterative.
  angular1   the same distance for single blocks: the K individually smallest (need not be contiguous)
  last       the deepest blocks, keeping the final one
  given      the blocks of --layers i,j,... (original indices; --remove, if given, must match their number)

saving:
  --replace none: a plain Hugging Face folder of the original class (AutoModelForCausalLM.from_pretrained).
  --replace linear: the folder carries modeling_linreg_pruned.py; load it with linreg.pruning.load_pruned(DIR)
  or AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True). See docs/analyze_and_prune.md.

examples:
  linreg prune --model gpt2 --data hf:roneneldan/TinyStories --split validation --remove 3 --out out/gpt2-r3
  linreg prune --model runs/m/hf --data val.txt --remove 4 --select cosine --replace linear --iterative --out out/c4
  linreg prune --model runs/m/hf --data val.txt --select given --layers 5,9 --replace linear --out out/g
  linreg prune --model runs/m/hf --data val.txt --sweep 0,1,2,3,4 --out out/sweep
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="linreg prune", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=EPILOG,
                                description="Remove K decoder blocks of a causal LM chosen by a score, optionally "
                                            "replacing each by a least-squares linear map; report perplexity before "
                                            "and after, or sweep K and plot it.")
    p.add_argument("--model", required=True, help="hub name or local folder of the causal LM to prune")
    p.add_argument("--data", required=True, metavar="FILE_OR_DATASET",
                   help="calibration (and evaluation) text: local file/folder/glob or hub data set (owner/name, hf:NAME)")
    p.add_argument("--split", default="train", help="hub split (default train)")
    p.add_argument("--hf-config", default=None, help="hub data set configuration")
    p.add_argument("--text-field", default="text", help="field holding the text in JSON/Parquet/hub data (default text)")
    p.add_argument("--eval-data", default=None, metavar="FILE_OR_DATASET",
                   help="separate text for perplexity (default: the --data tokens after the calibration tokens)")
    p.add_argument("--remove", type=int, default=None, metavar="K", help="number of blocks to cut (single-cut mode)")
    p.add_argument("--select", default="linearity", choices=list(SELECT_CHOICES),
                   help="how blocks are chosen (default linearity; see below)")
    p.add_argument("--metric", default="linearity", choices=["linearity", "linearity_wo_residual"],
                   help="with --select linearity: which linearity score ranks the blocks (default linearity)")
    p.add_argument("--layers", default=None, metavar="I,J,...",
                   help="with --select given: original block indices (--remove, if given, must equal their number)")
    p.add_argument("--replace", default="none", choices=["none", "linear"],
                   help="none: delete the blocks; linear: put the least-squares map input -> output in their place")
    p.add_argument("--iterative", action="store_true",
                   help="cut one block at a time and re-score (and re-fit) the changed model before the next")
    p.add_argument("--sweep", default=None, metavar="K1,K2,...|MAX",
                   help="instead of one cut: perplexity for each number of cut blocks (a list, or MAX for 0..MAX), "
                        "removal and linear replacement; writes sweep.json and pruning.png")
    p.add_argument("--distill-recipe", default=None, metavar="YAML",
                   help="with --sweep: also distill each linear-replaced model with this recipe (task.kind distill) "
                        "and add the curve")
    p.add_argument("--distill-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra --set overrides for the distillation runs (repeatable)")
    p.add_argument("--distill-launcher", default=None, metavar="CMD",
                   help="how to start a distillation run (default: this python, one rank); e.g. "
                        "'deepspeed --num_gpus 8'")
    p.add_argument("--max-tokens", type=int, default=65536, help="calibration tokens (default 65536)")
    p.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens for perplexity (default 65536)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: the pruned model (or the sweep results)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} {text!r}: expected comma-separated integers") from None


def _sweep_ks(text: str) -> list[int]:
    text = text.strip()
    if "," not in text:
        k = _ints(text, "--sweep")
        if len(k) != 1 or k[0] < 1:
            raise ConfigError(f"--sweep {text!r}: give MAX >= 1 or a list K1,K2,...")
        return list(range(k[0] + 1))
    ks = _ints(text, "--sweep")
    if any(k < 0 for k in ks):
        raise ConfigError(f"--sweep {text!r}: negative counts")
    return sorted(set(ks))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except LinregError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


def _load(args):
    import torch

    from linreg.analyze import check_token_budget, config_hidden_size, resolve_device, resolve_dtype
    from linreg.pruning.surgery import _read_config_dict, load_pruned, load_tokenizer
    from linreg.textdata import token_blocks

    cfg = _read_config_dict(args.model)
    dim = config_hidden_size(cfg)
    if dim is not None:
        check_token_budget(args.max_tokens, dim, f"{args.model}: --max-tokens (calibration)")
    dev = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, dev)
    try:
        tok = load_tokenizer(args.model)
    except Exception as exc:
        raise DataError(f"cannot load the tokenizer of {args.model}: {type(exc).__name__}: {exc}") from exc
    src = {"split": args.split, "text_field": args.text_field}
    if args.hf_config:
        src["hf_config"] = args.hf_config
    progress = not args.no_progress
    n_cal = -(-args.max_tokens // args.seq_len)
    if args.eval_data:
        cal = token_blocks(args.data, tok, args.seq_len, args.max_tokens, progress=progress, **src)
        ev = token_blocks(args.eval_data, tok, args.seq_len, args.eval_tokens, progress=progress, **src)
    else:
        both = token_blocks(args.data, tok, args.seq_len, n_cal * args.seq_len + args.eval_tokens, progress=progress,
                            **src)
        cal, ev = both[:n_cal], both[n_cal:]
    if len(ev) == 0:
        raise DataError(f"{args.eval_data or args.data}: no held-out block of {args.seq_len} tokens left for perplexity "
                        f"after {len(cal)} calibration blocks; add text, lower --max-tokens or pass --eval-data")
    model = load_pruned(args.model, dtype=dtype, device=dev)
    dim = dim or int(model.config.hidden_size)
    needs_fit = args.select == "linearity" or args.replace == "linear" or args.sweep
    if needs_fit:
        check_token_budget(int(cal.size), dim, f"{args.model}: calibration data {args.data}")
    batches = [{"input_ids": torch.from_numpy(np.ascontiguousarray(cal[i:i + args.batch_size]))}
               for i in range(0, len(cal), args.batch_size)]
    return model, tok, batches, cal, ev, dev, dtype


def _main(args: argparse.Namespace) -> int:
    if args.remove is not None and args.sweep is not None:
        raise ConfigError("give --remove K (one cut) or --sweep (perplexity against K), not both")
    if args.remove is None and args.sweep is None and args.select != "given":
        raise ConfigError("give --remove K (one cut) or --sweep (perplexity against K)")
    if args.distill_recipe and not args.sweep:
        raise ConfigError("--distill-recipe goes with --sweep (a single cut is distilled with launch/distill.py)")
    for name in ("max_tokens", "eval_tokens", "seq_len", "batch_size"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.select == "given" and not args.layers:
        raise ConfigError("--select given needs --layers i,j,...")
    if args.layers and args.select != "given":
        raise ConfigError("--layers only goes with --select given")
    given = _ints(args.layers, "--layers") if args.layers else None
    if given is not None and args.remove is not None and args.remove != len(given):
        raise ConfigError(f"--remove {args.remove} disagrees with the {len(given)} blocks named by --layers "
                          f"{args.layers} (leave --remove out with --select given)")
    if args.select == "angular" and args.iterative:
        raise ConfigError("--select angular chooses one contiguous run of K blocks in a single pass (Gromov et al.); "
                          "it has no iterative form. Use --select angular1 --iterative to cut one block per round")
    ks = _sweep_ks(args.sweep) if args.sweep else None
    if args.distill_recipe and not Path(args.distill_recipe).is_file():
        from linreg.recipe import resolve_path

        args.distill_recipe = str(resolve_path(args.distill_recipe, "--distill-recipe"))
    out = Path(args.out)
    if ks is not None:
        return _run_sweep(args, ks, given, out)  # loads the model itself, so no reference stays here
    model, tok, batches, cal, ev, dev, dtype = _load(args)
    progress = not args.no_progress

    from linreg.pruning.perplexity import perplexity
    from linreg.pruning.prune import prune_model
    from linreg.pruning.surgery import identity_block, provenance, save_pruned, swap_blocks

    t0 = time.perf_counter()
    before = perplexity(model, ev, batch_size=args.batch_size, progress=progress, desc="perplexity (original)")
    n_params_before = sum(p.numel() for p in model.parameters())
    report = prune_model(model, batches, args.remove or 0, select=args.select, replace=args.replace,
                         iterative=args.iterative, given=given, metric=args.metric, progress=progress)
    after = perplexity(model, ev, batch_size=args.batch_size, progress=progress, desc="perplexity (pruned)")
    result: dict[str, Any] = {"model": str(args.model), **report}
    ppl_block = {"original": before["perplexity"], "pruned": after["perplexity"]}
    if args.replace == "linear" and report["replaced"]:
        from linreg.hidden import find_blocks
        from linreg.pruning.linear_block import LinearBlock

        pos = [i for i, b in enumerate(find_blocks(model)) if isinstance(b, LinearBlock)]
        with swap_blocks(model, {p: identity_block(model, p) for p in pos}):
            removed = perplexity(model, ev, batch_size=args.batch_size, progress=progress, desc="perplexity (removed)")
        ppl_block = {"original": before["perplexity"], "removed": removed["perplexity"],
                     "linear": after["perplexity"]}
    result["perplexity"] = ppl_block
    result["eval_tokens"] = before["tokens"]
    result["calibration"] = {"data": str(args.data), "tokens": int(cal.size), "seq_len": args.seq_len}
    result["eval"] = {"data": str(args.eval_data or args.data), "tokens": int(ev.size), "blocks": int(len(ev))}
    result["parameters"] = {"before": n_params_before, "after": sum(p.numel() for p in model.parameters())}
    result["dtype"] = str(dtype).replace("torch.", "")
    result["seconds"] = time.perf_counter() - t0
    save_pruned(model, out, tokenizer=tok, extra={"prune": {k: result[k] for k in ("select", "score", "replace",
                                                                                     "iterative", "chosen")}})
    result["load"] = json.loads((out / "linreg_pruning.json").read_text())["load"]
    (out / "prune.json").write_text(json.dumps(result, indent=2) + "\n")
    info = provenance(model)
    print(f"cut {len(report['chosen'])} block(s) of {report['num_hidden_layers']['before']} by {report['score']}: "
          f"{report['chosen']} ({'replaced by linear maps' if args.replace == 'linear' else 'removed'})")
    print("perplexity: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl_block.items())
          + f" on {before['tokens']} held-out tokens")
    print(f"kept blocks (original indices): {info['kept_layers']}")
    print(f"wrote {out} ({result['load']}) and {out / 'prune.json'}")
    return 0


def _distill_cmd(args, student: Path, run_dir: Path) -> list[str]:
    from linreg.recipe import REPO_ROOT

    script = REPO_ROOT / "launch" / "distill.py"
    launcher = shlex.split(args.distill_launcher) if args.distill_launcher else [sys.executable]
    target = [str(script)] if script.is_file() else ["-m", "linreg.train.cli"]
    sets = [f"task.options.teacher={args.model}", f"task.options.student={student}", *args.distill_set]
    cmd = launcher + target + ["--recipe", str(args.distill_recipe), "--output-dir", str(run_dir), "--resume", "auto"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _run_sweep(args, ks, given, out: Path) -> int:
    from linreg.model import release_memory
    from linreg.pruning.perplexity import perplexity
    from linreg.pruning.prune import sweep
    from linreg.pruning.surgery import load_pruned, save_pruned

    model, tok, batches, cal, ev, dev, dtype = _load(args)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    replaced_dirs: dict[int, Path] = {}

    def ppl(m) -> float:
        return perplexity(m, ev, batch_size=args.batch_size, progress=progress)["perplexity"]

    def save_replaced(k: int, m) -> None:
        d = out / f"k{k}" / "replaced"
        save_pruned(m, d, tokenizer=tok)
        replaced_dirs[k] = d

    res = sweep(model, batches, ks, ppl, select=args.select, iterative=args.iterative, given=given, metric=args.metric,
                progress=progress, save_replaced=save_replaced if args.distill_recipe else None)
    res.update({"model": str(args.model), "calibration_tokens": int(cal.size), "eval_tokens": int(ev.size),
                "seq_len": args.seq_len})
    if args.distill_recipe:
        res["distilled"] = {}
        if "0" in res["linear"]:
            res["distilled"]["0"] = res["linear"]["0"]
        del model  # the only reference: the distillation runs get the memory (GPU memory on GPUs)
        release_memory()
        for k, student in sorted(replaced_dirs.items()):
            run_dir = out / f"k{k}" / "distill"
            cmd = _distill_cmd(args, student, run_dir)
            print(f"distilling K={k}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
            proc = subprocess.run(cmd)
            if proc.returncode != 0:
                raise LinregError(f"distillation of K={k} failed (exit {proc.returncode}); see the output above")
            distilled = load_pruned(run_dir / "hf", dtype=dtype, device=dev)
            res["distilled"][str(k)] = ppl(distilled)
            del distilled
            release_memory()
        res["distill_recipe"] = str(args.distill_recipe)
    (out / "sweep.json").write_text(json.dumps(res, indent=2) + "\n")
    plot_sweep(res, out / "pruning.png")
    print(f"{'K':>3}  {'removal':>10}  {'linear':>10}" + (f"  {'distilled':>10}" if "distilled" in res else ""))
    for k in ks:
        row = f"{k:>3}  {res['removal'].get(str(k), float('nan')):>10.3f}  {res['linear'].get(str(k), float('nan')):>10.3f}"
        if "distilled" in res:
            row += f"  {res['distilled'].get(str(k), float('nan')):>10.3f}"
        print(row)
    print(f"wrote {out / 'sweep.json'} and {out / 'pruning.png'}")
    return 0


def sweep_title(res: dict) -> str:
    """``<model label>: blocks chosen by <score>``; the label as in ``linreg analyze`` (``runs/tiny/hf`` ->
    ``tiny/hf``)."""
    from linreg.analyze import _short

    return (f"{_short(str(res.get('model', '')))}: blocks chosen by {res.get('score')}"
            + (" (iterative)" if res.get("iterative") else ""))


def plot_sweep(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    curves = [("removal", "removal", "o"), ("linear", "linear replacement", "s"),
              ("distilled", "linear replacement + distillation", "^")]
    for key, label, marker in curves:
        if key not in res or not res[key]:
            continue
        ks = sorted(int(k) for k in res[key])
        ax.plot(ks, [res[key][str(k)] for k in ks], marker=marker, label=label)
    if "0" in res.get("removal", {}):
        ax.axhline(res["removal"]["0"], color="gray", ls=":", lw=1, label="original")
    ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("blocks cut")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_title(sweep_title(res), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
