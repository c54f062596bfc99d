"""Judge throughput: requests/s against the loopback grading server with an artificial latency.

With a per-request latency L the ideal throughput at concurrency c is c / L; if the judge's
client loop adds nothing, requests/s grows linearly with c until the CPU (client + server on the
same machine) becomes the limit. A zero-latency run at the highest concurrency shows that ceiling.

    python benchmarks/bench_judge.py            # 50 ms latency, concurrency 1, 4, 16
    python benchmarks/bench_judge.py --quick    # fewer requests
Prints a Markdown table; writes JSON to benchmarks/results/bench_judge[-quick]-TIMESTAMP.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from evals.judge import JudgeConfig, grade_records


class ServerProcess:
    """The loopback server in its own process (so it does not share the client's GIL)."""

    def __init__(self, latency: float):
        self.proc = subprocess.Popen([sys.executable, "-m", "evals.loopback", "--latency", str(latency),
                                      "--duration", "900"], stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            self.close()
            raise RuntimeError(f"loopback server did not start (got {self.url!r})")

    @property
    def n_requests(self) -> int:
        with urllib.request.urlopen(self.url + "/stats", timeout=10) as r:
            return json.loads(r.read())["n_requests"]

    def close(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def server_process(latency: float):
    srv = ServerProcess(latency)
    try:
        yield srv
    finally:
        srv.close()


def run_one(server: ServerProcess, concurrency: int, n: int, tag: str) -> dict:
    records = [{"model": "bench", "beginning": f"Once upon a time {tag} {i}, a dog went to",
                "completion": f" the park {i} and played. [[grades 7 6 8 5 C]]"} for i in range(n)]
    cfg = JudgeConfig(model="bench", base_url=server.url, api_key="bench-key", concurrency=concurrency,
                      cache_dir=None, timeout=30, max_retries=2)
    before = server.n_requests
    t0 = time.perf_counter()
    graded, stats = grade_records(records, cfg, progress=False)
    wall = time.perf_counter() - t0
    assert all(r["parsed"] for r in graded) and server.n_requests - before == n
    return {"concurrency": concurrency, "requests": n, "seconds": wall, "requests_per_s": n / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer requests per setting (for CI/smoke runs)")
    p.add_argument("--latency-ms", type=float, default=50.0, help="artificial server latency (default: 50)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrency levels (default: 1,4,16)")
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"), help="where the JSON goes")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    lat = args.latency_ms / 1000
    # enough requests for every level to run ~1-4 s at its ideal rate
    per_level = {c: max(10, int((1.0 if args.quick else 4.0) * c / lat)) for c in levels}
    rows = []
    with server_process(lat) as server:
        run_one(server, 2, 4, "warmup")
        for c in levels:
            r = run_one(server, c, per_level[c], f"c{c}")
            r["ideal_requests_per_s"] = c / lat
            r["efficiency"] = r["requests_per_s"] / r["ideal_requests_per_s"]
            rows.append(r)
    with server_process(0.0) as server:
        c = max(levels)
        r = run_one(server, c, 100 if args.quick else 400, "ceiling")
        r.update(ideal_requests_per_s=None, efficiency=None, latency_ms=0.0)
        ceiling = r
    print(f"## Judge throughput against the loopback server ({args.latency_ms:g} ms latency per request)\n")
    print("| concurrency | requests | seconds | requests/s | ideal c/latency | efficiency |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['seconds']:.2f} | {r['requests_per_s']:.1f} | "
              f"{r['ideal_requests_per_s']:.0f} | {100 * r['efficiency']:.0f}% |")
    print(f"\nCPU ceiling (0 ms latency, concurrency {ceiling['concurrency']}, client and server processes "
          f"on this machine): {ceiling['requests_per_s']:.0f} requests/s.")
    out = {"benchmark": "bench_judge", "quick": args.quick, "latency_ms": args.latency_ms, "rows": rows,
           "ceiling": ceiling, "python": sys.version.split()[0], "machine": platform.machine(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_judge{'-quick' if args.quick else ''}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
