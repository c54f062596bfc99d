"""Cost of ``linreg analyze``'s measurement against a plain forward pass, and its peak memory against the token count.

Speed (one process, variants alternated over the same batches so they share machine noise):
  forward          model(input_ids, output_hidden_states=True): the plain forward the issue compares against
  forward-1logit   the same with logits_to_keep=1 (what analyze runs under its hooks: no full LM head)
  analyze          the measurement of ``linreg analyze``: linreg.pruning.select.block_statistics with float64
                   LinearityAccumulators for every block (hooks fold each block pair into the statistics)
  analyze-fp32acc  the same with float32 statistics (--accumulate-dtype float32; faster only where float64 is slow,
                   and lossy: it cuts eigenvalues below d * eps32, see docs/metrics.md)
Reported: tokens/s of each and the time ratio analyze / forward (target <= 1.3).

Memory (a fresh subprocess per point; CPU: peak RSS (VmHWM, reset after building the model) minus the RSS at that
moment; CUDA: max_memory_allocated minus memory_allocated; so it includes one batch's activations): analyze's streaming statistics at
growing token counts, next to the naive route that keeps every block's hidden states (output_hidden_states
concatenated over batches) for one least-squares fit.

    python benchmarks/bench_analyze.py [--quick] [--device cpu|cuda] [--threads 1]

Markdown tables go to stdout, everything to benchmarks/results/bench_analyze[-quick]-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {
    "quick": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=4096, seq=128, batch=4, batches=6, repeats=3,
                  mem_tokens=[1024, 4096, 16384]),
    "full": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=8192, seq=256, batch=8, batches=8, repeats=3,
                 mem_tokens=[2048, 8192, 32768, 65536]),
}


def build(size: dict, device: str):
    from transformers import MistralConfig, MistralForCausalLM

    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size")
    cfg = MistralConfig(**{k: size[k] for k in keys}, max_position_embeddings=4096, sliding_window=None)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return MistralForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def batches_for(size: dict, n: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, size["vocab_size"], (size["batch"], size["seq"]), generator=g).to(device)}
            for _ in range(n)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_variant(name: str, model, batches, device: str) -> float:
    from linreg.pruning.select import block_statistics

    _sync(device)
    t0 = time.perf_counter()
    if name == "forward":
        for b in batches:
            model(**b, output_hidden_states=True, use_cache=False)
    elif name == "forward-1logit":
        for b in batches:
            model(**b, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    elif name == "analyze":
        stats = block_statistics(model, batches, full=True)
        [stats.result(i) for i in stats.positions]
    elif name == "analyze-fp32acc":
        stats = block_statistics(model, batches, full=True, accumulate_dtype=torch.float32)
        [stats.result(i) for i in stats.positions]
    _sync(device)
    return time.perf_counter() - t0


def speed(size: dict, device: str) -> dict:
    model = build(size, device)
    batches = batches_for(size, size["batches"], device)
    tokens = size["batches"] * size["batch"] * size["seq"]
    names = ["forward", "forward-1logit", "analyze", "analyze-fp32acc"]
    for name in names:  # warm-up
        time_variant(name, model, batches[:1], device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(size["repeats"]):
        for name in names:
            times[name].append(time_variant(name, model, batches, device))
    med = {n: statistics.median(v) for n, v in times.items()}
    return {"tokens": tokens, "seconds": med, "tokens_per_s": {n: tokens / t for n, t in med.items()},
            "ratio_to_forward": {n: t / med["forward"] for n, t in med.items()}, "all_seconds": times}


# ------------------------------------------------------------------------------------------------ memory


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) so build-time transients do not hide what comes after (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _current_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.memory_allocated())
    rss = _status_kib("VmRSS")
    return rss * 1024 if rss is not None else _peak_bytes(device)


def memory_point(size_name: str, mode: str, tokens: int, device: str) -> dict:
    """Runs inside a fresh process: peak memory above the post-load level for ``tokens`` tokens."""
    from linreg.metrics import linearity_score  # noqa: F401  (imports before the baseline)
    from linreg.pruning.select import block_statistics

    size = SIZES[size_name]
    model = build(size, device)
    n = max(1, tokens // (size["batch"] * size["seq"]))
    # the batches themselves are made lazily, so their memory never piles up
    g = torch.Generator().manual_seed(1)

    def gen():
        for _ in range(n):
            yield {"input_ids": torch.randint(0, size["vocab_size"], (size["batch"], size["seq"]), generator=g).to(device)}

    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak()
    base = _current_bytes(device)
    with torch.no_grad():
        if mode == "analyze":
            stats = block_statistics(model, gen(), full=True)
            [stats.result(i) for i in stats.positions]
        else:  # naive: keep every block's states, then one fit per block (what a notebook does)
            from linreg.metrics import linearity_score

            kept: list[list[torch.Tensor]] = []
            for b in gen():
                hs = model(**b, output_hidden_states=True, use_cache=False, logits_to_keep=1).hidden_states
                kept.append([h.reshape(-1, h.shape[-1]) for h in hs])
            states = [torch.cat([k[i] for k in kept]) for i in range(len(kept[0]))]
            del kept
            [linearity_score(states[i], states[i + 1]) for i in range(len(states) - 1)]
    peak = _peak_bytes(device)
    return {"mode": mode, "tokens": n * size["batch"] * size["seq"], "peak_above_base_mb": (peak - base) / 2**20,
            "peak_mb": peak / 2**20, "base_mb": base / 2**20}


def memory(size_name: str, device: str, threads: int) -> list[dict]:
    out = []
    for tokens in SIZES[size_name]["mem_tokens"]:
        for mode in ("analyze", "naive"):
            cmd = [sys.executable, __file__, "--_memory-point", f"{size_name}:{mode}:{tokens}", "--device", device,
                   "--threads", str(threads)]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small model and token counts (a minute on a laptop CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--_memory-point", dest="memory_point", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_point:
        size_name, mode, tokens = args.memory_point.split(":")
        print(json.dumps(memory_point(size_name, mode, int(tokens), args.device)))
        return 0
    size_name = "quick" if args.quick else "full"
    size = SIZES[size_name]
    sp = speed(size, args.device)
    mem = memory(size_name, args.device, args.threads)
    desc = (f"Mistral d={size['hidden_size']}, {size['num_hidden_layers']} blocks, vocab {size['vocab_size']}, "
            f"{size['batch']}x{size['seq']} tokens/batch, {args.device}, {args.threads} thread(s)")
    print(f"### analyze speed ({desc}; {sp['tokens']} tokens, median of {size['repeats']})\n")
    print("| variant | tokens/s | time / forward |\n|---|---:|---:|")
    for name in sp["seconds"]:
        print(f"| {name} | {sp['tokens_per_s'][name]:,.0f} | {sp['ratio_to_forward'][name]:.2f}x |")
    print("\n### peak memory above the freshly built model (MiB; one batch's activations included)\n")
    toks = sorted({m["tokens"] for m in mem})
    print("| tokens | analyze (streaming) | naive (keep all states) |\n|---:|---:|---:|")
    for t in toks:
        a = next(m for m in mem if m["tokens"] == t and m["mode"] == "analyze")
        n = next(m for m in mem if m["tokens"] == t and m["mode"] == "naive")
        print(f"| {t:,} | {a['peak_above_base_mb']:.1f} | {n['peak_above_base_mb']:.1f} |")
    res_dir = REPO / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = res_dir / f"bench_analyze{'-quick' if args.quick else ''}-{stamp}.json"
    path.write_text(json.dumps({"config": {**size, "device": args.device, "threads": args.threads,
                                           "torch": torch.__version__}, "speed": sp, "memory": mem}, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
