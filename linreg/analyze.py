"""``linreg analyze``: layer-linearity profiles of any Hugging Face causal LM, or of every checkpoint of a run.

One model (or several, overlaid in the figures)::

    linreg analyze --model gpt2 --model facebook/opt-125m --data roneneldan/TinyStories --split validation \\
        --max-tokens 131072 --out results/profiles

writes ``DIR/linearity.json`` (schema in ``docs/analyze_and_prune.md``), ``DIR/linearity.png`` (linearity and
linearity without residual against normalized depth, one line per model) and ``DIR/errors.png`` (the per-token
error distribution of the blocks named by ``--error-layers``).

A training run::

    linreg analyze --checkpoints runs/mistral-150m --out results/dynamics            # every checkpoints/step_N
    linreg analyze --checkpoints runs/mistral-150m --from-log --out results/dynamics # linearity.jsonl, no model

adds ``DIR/linearity_dynamics.png`` (linearity of every block against the training step); with ``--error-layers``
also ``DIR/errors.png`` with one panel per checkpoint.

Memory: the model runs over batches; forward hooks fold each block's (input, output) pair into float64
sufficient statistics (``linreg.metrics.LinearityAccumulator``: O(d^2) per block, independent of the token
count) as soon as the block has run, so at most two hidden states of one batch are alive at a time. Only the
token ids of the text are kept (4-8 bytes a token).

Per-token errors need the fitted least-squares map, which exists only after all tokens were seen: a second
pass over the first ``--error-tokens`` tokens (default 16384) applies the map fitted on all ``--max-tokens``
tokens and records each token's relative squared error ``||x W + b - y||^2 / mean_t ||y_t - mean(y)||^2``
(its mean over all fitted tokens is ``1 - linearity``). Memory of that pass: one float per token and layer.

Checked before the model runs: the token budget, ``--seq-len`` against the context of learned position
embeddings, and the token ids against the model's embedding rows (both would end in an IndexError or a CUDA
device-side assert). NaN/Inf hidden states raise DataError naming the model (or checkpoint) and block.
``--accumulate-dtype float32`` is lossy (``linreg.metrics``); each block reports rank / features / precision_cut.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from linreg.errors import CheckpointError, ConfigError, DataError, LinregError, NotEnoughTokensError

__all__ = ["main", "analyze_model", "analyze_checkpoints", "load_checkpoint_state", "plot_profiles"]

PAIRS = "block i: input of block i -> output of block i, before any final norm"
METRICS = ("linearity", "linearity_wo_residual", "contribution_norm", "cosine")

EPILOG = """\
data:
  --data takes a local .txt (paragraphs are documents), .jsonl/.json/.parquet (--text-field), a folder or glob,
  or a hub data set: owner/name or hf:NAME (streamed; --split, --hf-config, --text-field).
  Documents are tokenized with each model's tokenizer and packed into blocks of --seq-len tokens.

tokens:
  The score needs more tokens than the hidden size (n > d + 1) and is only meaningful far above the chance
  level d/(n-1) that linearity.json reports as "baseline"; e.g. d=4096 wants 100k+ tokens. --seq-len must fit
  the context of models with learned position embeddings (GPT-2, OPT), and the tokenizer's ids the model's
  vocabulary; both are checked before the model runs.

precision:
  Statistics are float64 by default, also on GPUs: keep it. NaN/Inf hidden states (e.g. fp16 overflow) are
  refused with an error naming the model and block. Each block in linearity.json reports rank (directions of
  its input kept), features (non-constant features) and precision_cut (real directions dropped only because
  of float32 statistics: then the scores are too low).

examples:
  linreg analyze --model gpt2 --data hf:roneneldan/TinyStories --split validation --out out/gpt2
  linreg analyze --model runs/a/hf runs/b/hf --labels baseline cosine --data notes.txt --out out/ab
  linreg analyze --model meta-llama/Llama-2-7b-hf --dtype bfloat16 --device cuda --batch-size 4 \\
      --seq-len 1024 --max-tokens 262144 --data hf:roneneldan/TinyStories --split validation --out out/llama
  linreg analyze --checkpoints runs/mistral-150m --out out/dynamics
  linreg analyze --checkpoints runs/mistral-150m --error-layers 0,-1 --out out/dynamics
  linreg analyze --checkpoints runs/mistral-150m --from-log --out out/dynamics
"""


# ------------------------------------------------------------------------------------------------ helpers


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ConfigError(f"--dtype {dtype!r}: choose from auto, {', '.join(table)}")
    return table[dtype]


def config_hidden_size(cfg: dict) -> int | None:
    sub = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(sub.get(key), int):
            return sub[key]
    return None


def check_token_budget(n_tokens: int, dim: int, what: str) -> None:
    if n_tokens <= dim + 1:
        raise NotEnoughTokensError(n_tokens, dim, what)


_POSITION_EMBEDDINGS = ("wpe", "embed_positions", "position_embeddings")


def learned_position_limit(model: torch.nn.Module) -> int | None:
    """Longest sequence a model with learned absolute position embeddings (GPT-2, OPT, GPT-Neo...) accepts;
    None for rotary or ALiBi models (Llama, Mistral, BLOOM, NeoX), which have no hard limit."""
    tables = [m for name, m in model.named_modules()
              if isinstance(m, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_EMBEDDINGS]
    if not tables:
        return None
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return min(int(t.num_embeddings) for t in tables)


def check_model_inputs(model: torch.nn.Module, blocks: np.ndarray, what: str, tokenizer: str) -> None:
    """ConfigError (with the numbers) before any forward pass when the sequences are longer than a learned position
    table or the token ids do not fit the embedding (both end in an IndexError / CUDA device-side assert)."""
    seq_len = int(blocks.shape[1])
    limit = learned_position_limit(model)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"{what}: sequences of {seq_len} tokens exceed the model's context of {limit} positions "
                          f"(learned position embeddings, config n_positions / max_position_embeddings); "
                          f"use --seq-len {limit} or less")
    try:
        rows = int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        return
    hi, lo = int(blocks.max()), int(blocks.min())
    if hi >= rows or lo < 0:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        raise ConfigError(f"{what}: the tokenizer ({tokenizer}) produces token id {hi if hi >= rows else lo}, but the "
                          f"model's input embedding has {rows} rows (vocab_size {vocab}): ids must lie in 0..{rows - 1}; "
                          f"use the model's own tokenizer (--tokenizer)")


def accumulate_dtype_of(name: str | None) -> torch.dtype:
    """``--accumulate-dtype`` (None = the default, float64)."""
    if name in (None, "float64"):
        return torch.float64
    if name == "float32":
        return torch.float32
    raise ConfigError(f"--accumulate-dtype {name!r}: choose float64 or float32")


def batches_of(blocks: np.ndarray, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": torch.from_numpy(np.ascontiguousarray(blocks[i:i + batch_size]))}
            for i in range(0, len(blocks), batch_size)]


def parse_layers(text: str | None, n: int) -> list[int]:
    """``"0,3,-1"`` -> positions; ``auto`` -> first, middle, last; ``none``/empty -> []."""
    if text is None or text.strip().lower() in ("", "none"):
        return []
    if text.strip().lower() == "auto":
        return sorted({0, n // 2, n - 1})
    if text.strip().lower() == "all":
        return list(range(n))
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            i = int(part)
        except ValueError:
            raise ConfigError(f"layer list {text!r}: {part!r} is not an integer") from None
        if not -n <= i < n:
            raise ConfigError(f"layer {i} out of range for a model with {n} blocks (0..{n - 1}, or negative from the end)")
        out.append(i % n)
    return sorted(set(out))


# ------------------------------------------------------------------------------------------- measurement


RANK_KEYS = ("rank", "features", "precision_cut")


def _layer_entries(stats, n_blocks: int) -> list[dict[str, Any]]:
    layers = []
    for i in range(n_blocks):
        try:
            res = stats.result(i).to_dict()
        except NotEnoughTokensError:
            raise
        except DataError as exc:
            raise DataError(f"block {i}: {exc}") from exc
        entry = {"layer": i}
        entry.update({k: res[k] for k in METRICS})
        entry["angular_distance"] = stats.angular(i)
        entry["baseline"] = res["baseline"]
        entry.update({k: res[k] for k in RANK_KEYS})
        layers.append(entry)
    return layers


def precision_note(layers: list[dict]) -> str | None:
    """One line when the statistics' dtype cut real directions in some block (float32 statistics), else None."""
    cut = [(x["layer"], x.get("precision_cut") or 0) for x in layers if (x.get("precision_cut") or 0) > 0]
    if not cut:
        return None
    worst = max(cut, key=lambda c: c[1])
    return (f"note: in {len(cut)} block(s) the statistics' dtype cut real directions of the input (most: "
            f"{worst[1]} in block {worst[0]}; see rank / features / precision_cut in linearity.json): those "
            f"scores are too low; rerun with --accumulate-dtype float64")


@torch.no_grad()
def token_errors(model: torch.nn.Module, batches: Iterable[dict], fits: dict[int, tuple[torch.Tensor, torch.Tensor, float]],
                 max_tokens: int) -> dict[int, np.ndarray]:
    """Relative squared error of each token (first ``max_tokens``) under the fitted map of each layer in ``fits``
    (``{layer: (W, b, mean centered energy of y)}``)."""
    from linreg.pruning.select import _PairStream, _forward_kwargs, _model_device

    out: dict[int, list[np.ndarray]] = {i: [] for i in fits}
    device = _model_device(model)
    # float64 whatever the statistics' dtype (float32 accumulators fit float32 maps)
    dev_fits = {i: (w.to(device, torch.float64), b.to(device, torch.float64), e) for i, (w, b, e) in fits.items()}
    budget = {"left": int(max_tokens)}

    def sink(i, x, y):
        take = budget["cur"]
        x2 = x.reshape(-1, x.shape[-1])[:take].double()
        y2 = y.reshape(-1, y.shape[-1])[:take].double()
        w, b, energy = dev_fits[i]
        r = x2 @ w + b - y2
        out[i].append(((r * r).sum(-1) / energy).cpu().numpy())

    extra = _forward_kwargs(model)
    was = model.training
    model.eval()
    try:
        with _PairStream(model, list(fits), sink):
            for batch in batches:
                if budget["left"] <= 0:
                    break
                ids = batch["input_ids"].to(device)
                budget["cur"] = min(budget["left"], ids.numel())
                model(input_ids=ids, **extra)
                budget["left"] -= budget["cur"]
    finally:
        model.train(was)
    return {i: np.concatenate(v) if v else np.zeros(0) for i, v in out.items()}


def error_summary(errors: np.ndarray, bins: int = 40) -> dict[str, Any]:
    e = np.asarray(errors, dtype=np.float64)
    pos = e[e > 0]
    lo = float(np.log10(pos.min())) if pos.size else -12.0
    hi = float(np.log10(pos.max())) if pos.size else 0.0
    if hi - lo < 1e-9:
        hi = lo + 1.0
    edges = np.logspace(lo, hi, bins + 1)
    counts, _ = np.histogram(np.clip(e, edges[0], edges[-1]), bins=edges)
    q = np.quantile(e, [0.5, 0.9, 0.99]) if e.size else [float("nan")] * 3
    return {"tokens": int(e.size), "mean": float(e.mean()) if e.size else None, "median": float(q[0]),
            "p90": float(q[1]), "p99": float(q[2]), "max": float(e.max()) if e.size else None,
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


def measure(model: torch.nn.Module, blocks: np.ndarray, *, batch_size: int, error_layers: list[int],
            error_tokens: int, accumulate_dtype: torch.dtype = torch.float64, progress: bool = True,
            desc: str = "linearity") -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """Profile of ``model`` on ``blocks``: the ``layers`` part of an entry, plus raw per-token errors."""
    from linreg.hidden import find_blocks
    from linreg.pruning.select import block_statistics

    n_blocks = len(find_blocks(model))
    batches = batches_of(blocks, batch_size)
    t0 = time.perf_counter()
    stats = block_statistics(model, batches, full=True, accumulate_dtype=accumulate_dtype, progress=progress,
                             desc=desc, total=len(batches))
    layers = _layer_entries(stats, n_blocks)
    seconds = time.perf_counter() - t0
    errors: dict[int, np.ndarray] = {}
    if error_layers and error_tokens > 0:
        fits = {}
        for i in error_layers:
            acc = stats.accs[i]
            w, b = acc.fit_affine()
            energy = float(acc.qy.sum()) / acc.n_tokens
            fits[i] = (w, b, energy if energy > 0 else float("nan"))
        errors = token_errors(model, batches, fits, error_tokens)
    part = {
        "n_tokens": stats.n_tokens,
        "baseline": max(layer["baseline"] for layer in layers),
        "layers": layers,
        "mean": {m: _nanmean([layer[m] for layer in layers]) for m in METRICS},
        "seconds": seconds,
        "tokens_per_s": stats.n_tokens / seconds if seconds > 0 else None,
    }
    return part, errors


def error_distribution(errors: dict[int, np.ndarray]) -> dict[str, Any]:
    return {
        "normalization": "||x W + b - y||^2 / mean_t ||y_t - mean(y)||^2 with (W, b) fitted on all n_tokens; "
                         "the mean over the fitted tokens is 1 - linearity",
        "layers": [{"layer": i, **error_summary(e)} for i, e in sorted(errors.items())],
    }


def _nanmean(values: list) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def analyze_model(name: str, data: str, *, max_tokens: int, seq_len: int, batch_size: int, dtype: str = "auto",
                  device: str = "auto", error_layers: str | None = "auto", error_tokens: int = 16384,
                  tokenizer: str | None = None, label: str | None = None, accumulate_dtype: torch.dtype = torch.float64,
                  progress: bool = True, source_kwargs: dict | None = None) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """Load ``name``, read ``data``, measure; return the linearity.json entry and the per-token errors."""
    from linreg.hidden import find_blocks
    from linreg.pruning.surgery import _read_config_dict, load_pruned, load_tokenizer
    from linreg.textdata import token_blocks

    cfg = _read_config_dict(name)
    dim = config_hidden_size(cfg)
    if dim is not None:
        check_token_budget(max_tokens, dim, f"{name}: --max-tokens")
    dev = resolve_device(device)
    tdtype = resolve_dtype(dtype, dev)
    try:
        tok = load_tokenizer(tokenizer or name)
    except Exception as exc:
        raise DataError(f"cannot load the tokenizer of {tokenizer or name}: {type(exc).__name__}: {exc} "
                        f"(pass --tokenizer)") from exc
    blocks = token_blocks(data, tok, seq_len, max_tokens, progress=progress, **(source_kwargs or {}))
    n_tok = int(blocks.size)
    model = load_pruned(name, dtype=tdtype, device=dev)
    n_blocks = len(find_blocks(model))
    dim = dim or int(model.config.hidden_size)
    check_token_budget(n_tok, dim, f"{name} on {data} ({len(blocks)} blocks of {seq_len})")
    check_model_inputs(model, blocks, str(name), str(tokenizer or name))
    err_layers = parse_layers(error_layers, n_blocks)
    try:
        part, errors = measure(model, blocks, batch_size=batch_size, error_layers=err_layers,
                               error_tokens=error_tokens, accumulate_dtype=accumulate_dtype, progress=progress,
                               desc=f"linearity {label or name}")
    except NotEnoughTokensError:
        raise
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from exc
    entry = {
        "model": str(name),
        "label": label or _short(name),
        "architecture": type(model).__name__,
        "model_type": cfg.get("model_type"),
        "num_blocks": n_blocks,
        "hidden_size": dim,
        "dtype": str(tdtype).replace("torch.", ""),
        "accumulate_dtype": str(accumulate_dtype).replace("torch.", ""),
        "device": str(dev),
        "data": {"source": str(data), "seq_len": seq_len, "blocks": int(len(blocks)), **(source_kwargs or {})},
        "pairs": PAIRS,
        **part,
    }
    if errors:
        entry["error_distribution"] = error_distribution(errors)
    del model
    return entry, errors


def _short(name: str) -> str:
    p = Path(str(name))
    if p.name in ("hf", "model") and p.parent.name:
        return f"{p.parent.name}/{p.name}"
    return p.name or str(name)


# ------------------------------------------------------------------------------------------- checkpoints


def load_checkpoint_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint folder ``.../checkpoints/step_N``: merged from the ZeRO optimizer
    partitions (``deepspeed.utils.zero_to_fp32``), else the module state of ``mp_rank_00_model_states.pt``."""
    import contextlib
    import io

    from linreg.checkpoint import safe_torch_load

    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {step_dir}")
    err = None
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), safe_torch_load():
            state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
        if state:
            return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    except CheckpointError:
        raise  # refused by the weights-only loader: never retried less safely
    except Exception as exc:  # stage 0 checkpoints have no ZeRO partitions
        err = exc
    files = sorted(step_dir.glob("*model_states.pt"))
    if not files:
        raise CheckpointError(f"{step_dir}: no DeepSpeed model states (*model_states.pt)"
                              + (f"; zero_to_fp32 failed: {err}" if err else ""))
    with safe_torch_load():
        blob = torch.load(files[0], map_location="cpu")
    module = blob.get("module")
    if not module:
        raise CheckpointError(f"{files[0]}: no 'module' state in the checkpoint" + (f"; zero_to_fp32: {err}" if err else ""))
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def _run_architecture(run_dir: Path, recipe: Any, state: dict, arch: str | None) -> tuple[torch.nn.Module, str]:
    """An untrained model with the run's architecture (weights come from the checkpoint)."""
    from linreg.pruning.surgery import load_pruned

    if arch:
        return load_pruned(arch), f"--arch {arch}"
    hf = run_dir / "hf"
    if (hf / "config.json").is_file():
        return load_pruned(hf), str(hf)
    kind = recipe.task.kind
    if kind == "lm" and not recipe.model.init_from:
        from linreg.model import mistral_config
        from transformers import MistralForCausalLM

        emb = next((v for k, v in state.items() if k.endswith("embed_tokens.weight")), None)
        if emb is None:
            raise CheckpointError(f"{run_dir}: cannot find embed_tokens.weight in the checkpoint to size the vocabulary")
        cfg = mistral_config(recipe.model.config, vocab_size=int(emb.shape[0]), seq_len=recipe.train.seq_len,
                             attn_implementation=recipe.model.attn_implementation)
        return MistralForCausalLM(cfg), "recipe model.config"
    if kind == "lm" and recipe.model.init_from:
        return load_pruned(recipe.model.init_from), f"model.init_from {recipe.model.init_from}"
    if kind == "distill" and recipe.task.options.get("student"):
        return load_pruned(recipe.task.options["student"]), f"task.options.student {recipe.task.options['student']}"
    raise CheckpointError(f"{run_dir}: cannot rebuild the model of a {kind!r} run without its export {hf}; pass --arch "
                          f"with a Hugging Face folder of the same architecture")


def _run_tokenizer_and_blocks(run_dir: Path, recipe: Any, args: argparse.Namespace) -> tuple[Any, np.ndarray, str]:
    from linreg.pruning.surgery import load_tokenizer
    from linreg.textdata import token_blocks

    tok = None
    tok_path = args.tokenizer or (run_dir / "hf" if (run_dir / "hf" / "tokenizer_config.json").is_file() else None)
    if tok_path is not None:
        tok = load_tokenizer(tok_path)
    if args.data:
        if tok is None:
            tok = _prepared(recipe).tokenizer
        blocks = token_blocks(args.data, tok, args.seq_len, args.max_tokens, progress=not args.no_progress,
                              **_source_kwargs(args))
        return tok, blocks, str(args.data)
    data = _prepared(recipe)
    need = -(-args.max_tokens // recipe.train.seq_len)
    blocks = np.asarray(data.val[:need], dtype=np.int64)
    return tok or data.tokenizer, blocks, f"the run's validation split ({data.shard_dir})"


def _prepared(recipe: Any):
    from linreg.data import prepare_data
    from linreg.data.config import resolve_cache_dir

    return prepare_data(recipe.data, recipe.tokenizer, seq_len=recipe.train.seq_len,
                        cache_root=resolve_cache_dir(recipe.data), seed=recipe.train.seed, progress=False)


def _load_run_recipe(run_dir: Path):
    import yaml

    from linreg.config import from_dict
    from linreg.recipe import Recipe

    path = run_dir / "recipe.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no recipe.yaml (not a linreg run folder)")
    data = yaml.safe_load(path.read_text()) or {}
    data.pop("source", None)
    return from_dict(Recipe, data)


def analyze_checkpoints(run_dir: Path, args: argparse.Namespace,
                        errors_out: list[tuple[str, dict[int, np.ndarray]]] | None = None) -> dict[str, Any]:
    """Profiles of every complete checkpoint of a run (or of its linearity.jsonl with ``--from-log``).

    ``args`` are the CLI options (``build_parser``). With ``--error-layers`` each checkpoint also gets its per-token
    error distribution; the raw errors are appended to ``errors_out`` as ``("step N", {layer: errors})``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"--checkpoints {run_dir}: no such folder")
    error_layers = getattr(args, "error_layers", None)
    acc_name = getattr(args, "accumulate_dtype", None)
    if args.from_log:
        given = [opt for opt, v in (("--error-layers", error_layers), ("--accumulate-dtype", acc_name)) if v is not None]
        if given:
            raise ConfigError(f"--from-log plots the values the run logged (no model runs): {' and '.join(given)} "
                              f"need the checkpoints' models; drop --from-log")
        log = run_dir / "linearity.jsonl"
        if not log.is_file():
            raise CheckpointError(f"{log}: not found (tracking was off, or the run wrote nothing yet)")
        from linreg.tracking import read_jsonl_records

        recs: dict[int, dict] = {}
        for _, rec in read_jsonl_records(log):
            layers = [{"layer": i, **{k: layer.get(k) for k in METRICS}, "baseline": layer.get("baseline")}
                      for i, layer in enumerate(rec.get("layers", []))]
            recs[int(rec["step"])] = {"step": int(rec["step"]), "n_tokens": rec.get("n_tokens"),
                                      "baseline": rec.get("baseline"), "layers": layers,
                                      "mean": {m: _nanmean([x[m] for x in layers]) for m in METRICS}}
        if not recs:
            raise CheckpointError(f"{log}: no records")
        return {"run_dir": str(run_dir), "source": str(log), "pairs": PAIRS,
                "checkpoints": [recs[s] for s in sorted(recs)]}

    from linreg.checkpoint import list_checkpoints
    from linreg.hidden import find_blocks

    found = [(s, p) for s, p, complete in list_checkpoints(run_dir / "checkpoints") if complete]
    if not found:
        hint = " (use --from-log to plot run_dir/linearity.jsonl)" if (run_dir / "linearity.jsonl").is_file() else ""
        raise CheckpointError(f"{run_dir}/checkpoints: no complete step_N checkpoint{hint}")
    recipe = _load_run_recipe(run_dir)
    tok, blocks, source = _run_tokenizer_and_blocks(run_dir, recipe, args)
    dev = resolve_device(args.device)
    tdtype = resolve_dtype(args.dtype, dev)
    acc_dtype = accumulate_dtype_of(acc_name)
    model = None
    out = []
    arch_from = None
    err_layers: list[int] = []
    for step, path in found:
        state = load_checkpoint_state(path)
        if model is None:
            model, arch_from = _run_architecture(run_dir, recipe, state, args.arch)
            dim = int(model.config.hidden_size)
            check_token_budget(int(blocks.size), dim, f"{run_dir} on {source}")
            check_model_inputs(model, blocks, f"{run_dir} ({arch_from})",
                               str(args.tokenizer or getattr(tok, "name_or_path", None) or "the run's tokenizer"))
            err_layers = parse_layers(error_layers, len(find_blocks(model)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        missing = [k for k in missing if k not in tied and not k.startswith("lm_head")]
        if missing or unexpected:
            raise CheckpointError(f"{path}: weights do not match the architecture from {arch_from} "
                                  f"(missing {missing[:5]}, unexpected {list(unexpected)[:5]})")
        model.to(device=dev, dtype=tdtype)
        try:
            part, errors = measure(model, blocks, batch_size=args.batch_size, error_layers=err_layers,
                                   error_tokens=args.error_tokens, accumulate_dtype=acc_dtype,
                                   progress=not args.no_progress, desc=f"step {step}")
        except NotEnoughTokensError:
            raise
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from exc
        rec = {"step": step, "checkpoint": str(path), **part}
        if errors:
            rec["error_distribution"] = error_distribution(errors)
            if errors_out is not None:
                errors_out.append((f"step {step}", errors))
        out.append(rec)
    return {"run_dir": str(run_dir), "source": "checkpoints", "architecture_from": arch_from, "data": source,
            "dtype": str(tdtype).replace("torch.", ""), "accumulate_dtype": str(acc_dtype).replace("torch.", ""),
            "num_blocks": len(find_blocks(model)), "pairs": PAIRS, "checkpoints": out}


# ------------------------------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def normalized_depth(n: int) -> list[float]:
    return [i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def plot_profiles(entries: list[dict], path: Path, title: str | None = None) -> Path:
    """Linearity and linearity without residual against normalized depth, one line per entry."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for entry in entries:
        layers = entry["layers"]
        xs = normalized_depth(len(layers))
        label = entry.get("label") or entry.get("model") or f"step {entry.get('step')}"
        for ax, metric in zip(axes, ("linearity", "linearity_wo_residual")):
            ys = [np.nan if layer[metric] is None else layer[metric] for layer in layers]
            ax.plot(xs, ys, marker="o", ms=3, label=label, color=entry.get("_color"))
    for ax, metric in zip(axes, ("linearity score", "linearity score without residual")):
        ax.set_xlabel("normalized depth (block index / (L - 1))")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_errors(per_model: list[tuple[str, dict[int, np.ndarray]]], path: Path) -> Path:
    plt = _plt()
    n = len(per_model)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (label, errors) in zip(axes.flat, per_model):
        allpos = np.concatenate([e[e > 0] for e in errors.values()]) if errors else np.zeros(0)
        if allpos.size:
            edges = np.logspace(np.log10(allpos.min()), np.log10(allpos.max()) + 1e-9, 50)
            for i, e in sorted(errors.items()):
                ax.hist(np.clip(e, edges[0], edges[-1]), bins=edges, histtype="step", lw=1.5,
                        label=f"block {i} (mean {e.mean():.3g})")
            ax.set_xscale("log")
        ax.set_xlabel("per-token relative squared error of the linear fit")
        ax.set_ylabel("tokens")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_dynamics(result: dict, path: Path) -> Path:
    """Linearity of every block against the training step (one line per block, colored by depth)."""
    plt = _plt()
    recs = result["checkpoints"]
    steps = [r["step"] for r in recs]
    n = max(len(r["layers"]) for r in recs)
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("linearity", "linearity_wo_residual")):
        for i in range(n):
            ys = [r["layers"][i][metric] if i < len(r["layers"]) and r["layers"][i][metric] is not None else np.nan
                  for r in recs]
            ax.plot(steps, ys, color=cmap(i / max(n - 1, 1)), lw=1.2, marker="o" if len(steps) < 15 else None, ms=3,
                    label=f"block {i}" if n <= 12 else None)
        means = [r["mean"][metric] if r["mean"][metric] is not None else np.nan for r in recs]
        ax.plot(steps, means, color="black", lw=2.2, ls="--", label="mean")
        ax.set_xlabel("training step")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"layer linearity during training: {result['run_dir']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------- CLI


def _source_kwargs(args: argparse.Namespace) -> dict:
    kw = {"split": args.split, "text_field": args.text_field}
    if args.hf_config:
        kw["hf_config"] = args.hf_config
    return kw


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="linreg analyze", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Layer-linearity profile (linearity score with and without residual, contribution norm, cosine) "
                    "of Hugging Face causal LMs on text, or of every checkpoint of a linreg training run.")
    what = p.add_argument_group("what to analyze (one of)")
    what.add_argument("--model", nargs="+", action="extend", default=[], metavar="NAME_OR_PATH",
                      help="hub name or local folder of a causal LM (also folders written by linreg prune); "
                           "several models are overlaid in the figures")
    what.add_argument("--checkpoints", metavar="RUN_DIR", default=None,
                      help="a linreg run folder: analyze every complete checkpoints/step_N and plot linearity "
                           "against the training step")
    p.add_argument("--from-log", action="store_true",
                   help="with --checkpoints: plot RUN_DIR/linearity.jsonl written during training (no model runs)")
    p.add_argument("--arch", default=None, metavar="HF_DIR",
                   help="with --checkpoints: a Hugging Face folder with the run's architecture (default: RUN_DIR/hf, "
                        "else rebuilt from RUN_DIR/recipe.yaml)")
    p.add_argument("--data", default=None, metavar="FILE_OR_DATASET",
                   help="text to run: local .txt/.jsonl/.json/.parquet file, folder or glob, or a hub data set "
                        "(owner/name or hf:NAME). Required with --model; with --checkpoints the default is the run's "
                        "own validation split")
    p.add_argument("--split", default="train", help="hub data set split (default: train)")
    p.add_argument("--hf-config", default=None, help="hub data set configuration name")
    p.add_argument("--text-field", default="text", help="JSON/Parquet/hub field holding the text (default: text)")
    p.add_argument("--labels", nargs="+", default=None, help="legend labels, one per --model (default: names)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or name (default: the model's own)")
    p.add_argument("--max-tokens", type=int, default=131072,
                   help="tokens to measure (default 131072); must exceed the hidden size + 1, and should exceed it "
                        "many times over")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--dtype", default="auto",
                   help="model weights: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16 (may "
                        "overflow: non-finite hidden states are refused); the statistics follow --accumulate-dtype")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--accumulate-dtype", default=None, choices=["float64", "float32"],
                   help="dtype of the running statistics and of the solve. float64 (default) is recommended on every "
                        "device (H100/H200-class GPUs run it fast). float32 is lossy, not just in the last digits: "
                        "eigenvalues below d*eps32 of the largest (1.2e-4 at d=1024, 4.9e-4 at d=4096) are cut, "
                        "which drops real directions of hidden states, so the scores come out too low (e.g. "
                        "1 - linearity 7x too large at d=1024); use it only where float64 is far slower (consumer "
                        "GPUs). linearity.json reports rank, features and precision_cut of every block")
    p.add_argument("--error-layers", default=None, metavar="I,J,...|auto|all|none",
                   help="blocks whose per-token error distribution is plotted to errors.png (auto: first, middle, "
                        "last). Default: auto with --model; none with --checkpoints, where the given blocks are "
                        "measured at every checkpoint (one panel per step)")
    p.add_argument("--error-tokens", type=int, default=16384,
                   help="tokens of the second pass that records per-token errors (default 16384)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except LinregError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


def _main(args: argparse.Namespace) -> int:
    if bool(args.model) == bool(args.checkpoints):
        raise ConfigError("give exactly one of --model (one or several) or --checkpoints RUN_DIR")
    if args.from_log and not args.checkpoints:
        raise ConfigError("--from-log needs --checkpoints RUN_DIR")
    for name in ("max_tokens", "seq_len", "batch_size"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    out = Path(args.out)
    acc_dtype = accumulate_dtype_of(args.accumulate_dtype)

    if args.checkpoints:
        ckpt_errors: list[tuple[str, dict[int, np.ndarray]]] = []
        result = analyze_checkpoints(Path(args.checkpoints), args, errors_out=ckpt_errors)
        out.mkdir(parents=True, exist_ok=True)
        (out / "linearity.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_dynamics(result, out / "linearity_dynamics.png")
        plt = _plt()
        cmap = plt.get_cmap("plasma")
        recs = result["checkpoints"]
        entries = [{**r, "label": f"step {r['step']}", "_color": cmap(k / max(len(recs) - 1, 1) * 0.85)}
                   for k, r in enumerate(recs)]
        plot_profiles(entries, out / "linearity.png", title=str(args.checkpoints))
        written = [out / "linearity.json", out / "linearity.png", out / "linearity_dynamics.png"]
        if ckpt_errors:
            written.append(plot_errors(ckpt_errors, out / "errors.png"))
        print(f"{len(recs)} checkpoint(s) of {args.checkpoints}: steps {[r['step'] for r in recs]}")
        for r in recs:
            note = precision_note(r["layers"])
            if note:
                print(f"step {r['step']}: {note}")
        print("wrote " + ", ".join(str(w) for w in written))
        return 0

    if not args.data:
        raise ConfigError("--model needs --data FILE_OR_DATASET")
    if args.labels is not None and len(args.labels) != len(args.model):
        raise ConfigError(f"--labels: {len(args.labels)} labels for {len(args.model)} models")
    entries, errors = [], []
    for k, name in enumerate(args.model):
        label = args.labels[k] if args.labels else None
        entry, errs = analyze_model(name, args.data, max_tokens=args.max_tokens, seq_len=args.seq_len,
                                    batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                                    error_layers="auto" if args.error_layers is None else args.error_layers,
                                    error_tokens=args.error_tokens,
                                    tokenizer=args.tokenizer, label=label, accumulate_dtype=acc_dtype,
                                    progress=not args.no_progress, source_kwargs=_source_kwargs(args))
        entries.append(entry)
        if errs:
            errors.append((entry["label"], errs))
        _print_table(entry)
    out.mkdir(parents=True, exist_ok=True)
    if len(entries) == 1:
        doc: dict[str, Any] = entries[0]
    else:
        doc = {"models": entries}
        for entry in entries:
            sub = out / _slug(entry["label"])
            sub.mkdir(parents=True, exist_ok=True)
            (sub / "linearity.json").write_text(json.dumps(entry, indent=2) + "\n")
    (out / "linearity.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot_profiles(entries, out / "linearity.png")
    written = [out / "linearity.json", out / "linearity.png"]
    if errors:
        written.append(plot_errors(errors, out / "errors.png"))
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _print_table(entry: dict) -> None:
    speed = f", {entry['tokens_per_s']:.0f} tokens/s" if entry.get("tokens_per_s") else ""
    print(f"\n{entry['label']} ({entry['architecture']}, {entry['num_blocks']} blocks, d={entry['hidden_size']}): "
          f"{entry['n_tokens']} tokens, chance level {entry['baseline']:.4f}{speed}")
    print(f"{'block':>5}  {'linearity':>9}  {'w/o resid':>9}  {'contrib':>8}  {'cosine':>7}")
    for layer in entry["layers"]:
        vals = [layer[m] if layer[m] is not None else float("nan") for m in METRICS]
        print(f"{layer['layer']:>5}  {vals[0]:>9.4f}  {vals[1]:>9.4f}  {vals[2]:>8.4f}  {vals[3]:>7.4f}")
    note = precision_note(entry["layers"])
    if note:
        print(note)


if __name__ == "__main__":
    sys.exit(main())
