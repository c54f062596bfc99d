"""Helpers for tests that run the real training entry point in subprocesses (1 rank or the deepspeed
launcher with several CPU ranks)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "launch" / "pretrain.py"

# a very small model and corpus: a few seconds of CPU per run
FAST = [
    "model.config.hidden_size=64",
    "model.config.intermediate_size=160",
    "model.config.num_hidden_layers=3",
    "model.config.num_attention_heads=4",
    "model.config.num_key_value_heads=2",
    "data.embedded_docs=800",
    "data.val_docs=40",
    "tokenizer.vocab_size=512",
    "train.seq_len=64",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "train.log_every=1",
    "train.eval_every=8",
    "train.eval_blocks=8",
    "track.every=8",
    "track.blocks=8",
    "optimizer.lr=3e-3",
    "optimizer.warmup_steps=4",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(cache: Path, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["LINREG_DATA_CACHE"] = str(cache)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_pretrain(out: Path, sets: list[str], cache: Path, *, ranks: int = 1, recipe: str = "recipes/tiny.yaml",
                 env: dict | None = None, resume: str = "auto", check: bool = True,
                 timeout: int = 600) -> subprocess.CompletedProcess:
    args = ["--recipe", str(REPO / recipe), "--output-dir", str(out), "--resume", resume]
    for s in sets:
        args += ["--set", s]
    if ranks == 1:
        cmd = [sys.executable, str(PRETRAIN), *args]
    else:
        launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
        cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(PRETRAIN), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env_for(cache, env), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def losses(run_dir: Path, key: str = "loss/total") -> dict[int, float]:
    """step -> logged value; a resumed run's lines win over older ones for the same step."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            out[rec["step"]] = rec[key]
    return out


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted((Path(run_dir) / "hf").glob("*.safetensors"))
    assert files, f"no safetensors export in {run_dir}/hf"
    state = {}
    for f in files:
        state.update(load_file(f))
    return state
