"""Data pipeline benchmark: preparation throughput and the cost of reading one training batch.

    python benchmarks/bench_data.py [--quick] [--corpus FILE] [--num-proc 1,2] [--seq-len 512]

1. Trains a byte-level BPE once on the corpus (reported separately), then prepares the corpus from
   scratch with each ``--num-proc`` value into a fresh cache (tokenization + packing + writing),
   reporting tokens/s of the tokenization pass and of the whole build.
2. Reads random training batches (``--batch`` blocks of ``--seq-len``) from the memory-mapped
   train.npy in the order the trainer uses (``global_batch_indices``), as the trainer's collate does,
   and reports microseconds per batch. Divide by the measured step time to get the input pipeline's
   share of a training step.

Corpus: the shared TinyStories sample (../shared/data/tinystories-sample.txt) repeated ``--repeat``
times into a temporary file (never into the repository), or synthetic stories when it is absent.
Markdown table to stdout, JSON into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from linreg.data import DataConfig, SourceConfig, TokenizerConfig, prepare_data, synthetic_stories  # noqa: E402
from linreg.data.loader import global_batch_indices, read_batch  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "tinystories-sample.txt"


def _corpus(tmp: Path, repeat: int, source: str | None) -> tuple[Path, str]:
    path = Path(source) if source else SHARED
    out = tmp / "corpus.txt"
    if path.is_file():
        text = path.read_text(encoding="utf-8").strip()
        name = f"{path.name} x{repeat}"
    else:
        text = "\n\n".join(synthetic_stories(4000, seed=0))
        name = f"synthetic stories (4000 docs) x{repeat}"
    with open(out, "w", encoding="utf-8") as fh:
        for _ in range(repeat):
            fh.write(text + "\n\n")
    return out, name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small run: corpus once, smaller vocabulary, fewer reads")
    p.add_argument("--corpus", default=None, help="a .txt corpus (default: the shared TinyStories sample)")
    p.add_argument("--repeat", type=int, default=None, help="concatenate the corpus this many times (default 4, quick 1)")
    p.add_argument("--num-proc", default="1,2", help="comma-separated tokenization worker counts to compare")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per block")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary (default 8192, quick 2048)")
    p.add_argument("--batch", type=int, default=32, help="blocks per batch read from the memmap")
    p.add_argument("--reads", type=int, default=None, help="number of batches read (default 2000, quick 300)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for the JSON result")
    args = p.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 4)
    vocab = args.vocab_size or (2048 if args.quick else 8192)
    reads = args.reads or (300 if args.quick else 2000)
    procs = [int(x) for x in args.num_proc.split(",") if x]

    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        corpus, corpus_name = _corpus(tmp, repeat, args.corpus)
        mb = corpus.stat().st_size / 1e6
        data = DataConfig(sources=[SourceConfig(path=str(corpus))], val_fraction=0.005)

        import datasets  # noqa: F401  (import cost kept out of the timings)
        import transformers  # noqa: F401

        t = time.perf_counter()
        first = prepare_data(data, TokenizerConfig(vocab_size=vocab), args.seq_len, tmp / "tok-cache", seed=0,
                             progress=False)
        tok_train_s = time.perf_counter() - t - first.stats["build_seconds"]
        tokc = TokenizerConfig(path=str(first.tokenizer_dir))

        rows = []
        prepared = None
        for n in procs:
            t = time.perf_counter()
            prep = prepare_data(data, tokc, args.seq_len, tmp / f"cache-np{n}", seed=0, num_proc=n, progress=False)
            wall = time.perf_counter() - t
            s = prep.stats
            tokens = s["train_tokens"] + s["train_dropped_tokens"] + s["val_tokens"] + s["val_dropped_tokens"]
            rows.append({
                "num_proc": n,
                "tokens": tokens,
                "tokenize_s": s["tokenize_seconds"],
                "build_s": s["build_seconds"],
                "wall_s": round(wall, 3),
                "tokenize_tok_per_s": round(tokens / s["tokenize_seconds"]),
                "build_tok_per_s": round(tokens / s["build_seconds"]),
                "wall_tok_per_s": round(tokens / wall),
            })
            if prepared is not None:
                assert np.array_equal(prepared.train, prep.train), "num_proc changed the shards"
            prepared = prep

        t = time.perf_counter()
        again = prepare_data(data, tokc, args.seq_len, tmp / f"cache-np{procs[-1]}", seed=0, progress=False)
        reuse_s = time.perf_counter() - t
        assert again.stats["reused"]

        train = prepared.train
        n_blocks = train.shape[0]
        batch = min(args.batch, n_blocks)
        times = []
        for step in range(reads):
            idx = global_batch_indices(n_blocks, batch, step, seed=0)
            t = time.perf_counter_ns()
            rows_ = read_batch(train, idx)
            times.append(time.perf_counter_ns() - t)
            assert rows_.shape == (batch, args.seq_len)
        times_us = np.array(times[10:] if len(times) > 20 else times) / 1e3
        t = time.perf_counter_ns()
        for step in range(reads):
            global_batch_indices(n_blocks, batch, step, seed=0)
        idx_us = (time.perf_counter_ns() - t) / reads / 1e3
        read = {
            "batch_blocks": batch,
            "seq_len": args.seq_len,
            "batch_bytes": int(batch * args.seq_len * train.dtype.itemsize),
            "reads": reads,
            "read_us_median": round(float(np.median(times_us)), 1),
            "read_us_p90": round(float(np.percentile(times_us, 90)), 1),
            "index_us": round(idx_us, 1),
            "n_blocks": int(n_blocks),
        }

        result = {
            "benchmark": "bench_data",
            "quick": args.quick,
            "corpus": corpus_name,
            "corpus_mb": round(mb, 2),
            "vocab_size": vocab,
            "dtype": str(train.dtype),
            "tokenizer_train_s": round(tok_train_s, 3),
            "reuse_s": round(reuse_s, 3),
            "prepare": rows,
            "batch_read": read,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"## Data preparation: {corpus_name} ({mb:.1f} MB), vocab {vocab}, seq_len {args.seq_len}, "
          f"{os.cpu_count()} CPUs\n")
    print(f"Reading + BPE training: {result['tokenizer_train_s']:.2f} s (once; cached afterwards). "
          f"Reuse of prepared shards: {result['reuse_s'] * 1e3:.0f} ms.\n")
    print("| num_proc | tokens | tokenize s | tokenize tok/s | build s | build tok/s | wall s | wall tok/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['num_proc']} | {r['tokens']:,} | {r['tokenize_s']:.2f} | {r['tokenize_tok_per_s']:,} | "
              f"{r['build_s']:.2f} | {r['build_tok_per_s']:,} | {r['wall_s']:.2f} | {r['wall_tok_per_s']:,} |")
    print(f"\n## Batch read from the memmap ({read['batch_blocks']} x {read['seq_len']} {train.dtype}, "
          f"{read['batch_bytes'] / 1024:.0f} KiB, {read['n_blocks']} blocks)\n")
    print("| median µs/batch | p90 µs/batch | index computation µs/step |")
    print("|---:|---:|---:|")
    print(f"| {read['read_us_median']:.1f} | {read['read_us_p90']:.1f} | {read['index_us']:.1f} |")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_data{'-quick' if args.quick else ''}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
