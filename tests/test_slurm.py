"""SLURM for real: `linreg submit` against munged + slurmctld + slurmd started on loopback.

The cluster (tests/slurm_cluster.py) is one node with 2 CPUs (or two slurmd, n1 and n2, for the
multi-node test); jobs run the real `launch/pretrain.py` on `recipes/tiny.yaml` with DeepSpeed CPU
ranks over gloo, started by launch/slurm/pretrain.sbatch through srun. Skipped with the reason when
the SLURM or munge binaries are missing (Debian packages `slurmctld slurmd munge`).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

try:
    from tests.slurm_cluster import slurm_cluster, slurm_cluster_2nodes  # noqa: F401  (pytest fixtures)
except ImportError:  # tests/ on sys.path instead of the repository root
    from slurm_cluster import slurm_cluster, slurm_cluster_2nodes  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny.yaml"
# a short run of the tiny recipe; small evaluation, no linearity tracking (not what is tested here)
FAST = ("train.steps=6", "checkpoint.save_every=3", "train.log_every=1", "train.eval_blocks=2",
        "track.enabled=false")


def _submit(cluster, out: Path, *sets: str, nodes: int = 1, ranks: int = 2, env: tuple[str, ...] = ()) -> str:
    argv = [sys.executable, "-m", "linreg.cli", "submit", "--recipe", str(RECIPE), "--cpu",
            "--nodes", str(nodes), "--gpus-per-node", str(ranks), "--cpus-per-task", str(ranks),
            "--time", "00:10:00", "--output-dir", str(out), "--env", "OMP_NUM_THREADS=1"]
    for s in sets:
        argv += ["--set", s]
    for e in env:
        argv += ["--env", e]
    p = cluster.run(argv, check=False, cwd=REPO)
    assert p.returncode == 0, f"linreg submit failed:\n{p.stdout}\n{p.stderr}"
    job_id = p.stdout.strip()
    assert job_id.isdigit(), p.stdout
    assert f"slurm-{job_id}.out" in p.stderr
    return job_id


def _log(out: Path, job_id: str) -> str:
    f = out / f"slurm-{job_id}.out"
    return f.read_text(errors="replace") if f.exists() else "(no log)"


def _scalars(tb_dir: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: dict[str, list[int]] = {}
    for f in sorted(tb_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            steps.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    return steps


def test_submit_two_rank_run(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    job_id = _submit(slurm_cluster, out, *FAST)
    info = slurm_cluster.wait_job(job_id, timeout=240)
    log = _log(out, job_id)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log}\n{slurm_cluster.logs()}"
    assert "nodes=1 ranks/node=2" in log
    assert (out / "slurm-submit.sbatch").is_file()
    # both ranks ran, one launcher on the one node
    assert "dist_world_size=2" in log, log
    scalars = _scalars(out / "tensorboard")
    assert scalars, f"no TensorBoard scalars in {out / 'tensorboard'}"
    assert max(max(v) for v in scalars.values()) == 6
    assert {"loss/total"} <= set(scalars), sorted(scalars)
    for step in (3, 6):
        assert _complete(out, step), sorted(out.rglob("*"))
    assert (out / "hf" / "config.json").is_file()
    assert "resumed from step" not in log


def _expedite(cluster, job_id: str, info: dict) -> None:
    """SLURM holds a requeued job back for 120 s (BeginTime); start it now instead of waiting."""
    if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
        cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)


def _wait_for(cond, timeout: float, what: str, cluster, job_id: str, out: Path) -> None:
    t0 = time.monotonic()
    while not cond():
        info = cluster.job_info(job_id)
        _expedite(cluster, job_id, info)
        state = info.get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "COMPLETING"), \
            f"job {job_id} is {state} while waiting for {what}\n{_log(out, job_id)}"
        assert time.monotonic() - t0 < timeout, f"no {what} after {timeout:.0f} s\n{_log(out, job_id)}"
        time.sleep(0.5)


def _newest_complete(out: Path) -> int:
    steps = [int(p.parent.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*/COMPLETE")]
    return max(steps, default=0)


def _complete(out: Path, step: int) -> bool:
    return (out / "checkpoints" / f"step_{step}" / "COMPLETE").is_file()


def test_requeue_resumes_from_checkpoint(slurm_cluster, tmp_path):
    """Preempted twice - `scontrol requeue` (admin/preemption), then the time-limit warning signal
    (SIGUSR1 to the batch shell, as --signal=B:USR1@120 sends it) - and resumed both times."""
    out = tmp_path / "run"
    steps, save_every = 48, 4
    job_id = _submit(slurm_cluster, out, *FAST, f"train.steps={steps}", f"checkpoint.save_every={save_every}",
                     "checkpoint.export_hf=false", env=("LINREG_TEST_STEP_DELAY=0.25",))
    log = lambda: _log(out, job_id)  # noqa: E731

    # 1) first complete checkpoint, then requeue the running job as an admin or preemption would
    _wait_for(lambda: _complete(out, save_every), 180, "first checkpoint", slurm_cluster, job_id, out)
    slurm_cluster.run(["scontrol", "requeue", job_id])

    # 2) second start resumes; after its next checkpoint the batch shell gets the time-limit signal
    _wait_for(lambda: re.search(r"resumed from step (\d+)", log()), 180, "resume after requeue",
              slurm_cluster, job_id, out)
    first_resume = int(re.search(r"resumed from step (\d+)", log()).group(1))
    _wait_for(lambda: _newest_complete(out) > first_resume, 120, "checkpoint after resume",
              slurm_cluster, job_id, out)
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job_id])

    # 3) the job requeued itself, resumes again and finishes
    deadline = time.monotonic() + 180
    while True:
        info = slurm_cluster.job_info(job_id)
        if info.get("JobState") == "COMPLETED" and int(info.get("Restarts", 0)) >= 2:
            break
        assert info.get("JobState") not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), f"{info}\n{log()}"
        _expedite(slurm_cluster, job_id, info)
        assert time.monotonic() < deadline, f"requeued job not done: {info}\n{log()}"
        time.sleep(1.0)

    text = log()
    starts = re.findall(r"job \d+ start (\d+) \(restart count (\d+)\)", text)
    assert [s[1] for s in starts] == ["0", "1", "2"], text
    assert "SIGUSR1: time limit near; requeueing job" in text
    resumed = [int(n) for n in re.findall(r"resumed from step (\d+)", text)]
    assert len(resumed) == 2, text
    assert save_every <= resumed[0] < resumed[1] < steps, text
    # a preempted step saves where it stopped (SIGTERM handler), so resumes need not be on save_every
    assert text.count("stopped by signal SIGTERM") >= 1, text
    assert _complete(out, steps)
    assert max(max(v) for v in _scalars(out / "tensorboard").values()) == steps
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == steps, logged


def test_two_nodes_one_launcher_each(slurm_cluster_2nodes, tmp_path):
    """The multi-node route: srun starts one `deepspeed --no_ssh --node_rank K` per node."""
    cluster = slurm_cluster_2nodes
    out = tmp_path / "run"
    job_id = _submit(cluster, out, *FAST, "checkpoint.export_hf=false", nodes=2, ranks=1)
    info = cluster.wait_job(job_id, timeout=240)
    log = _log(out, job_id)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log}\n{cluster.logs()}"
    assert info["NodeList"] == "n[1-2]", info
    assert "nodes=2 ranks/node=1 master=127.0.0.1:" in log  # n1's NodeAddr
    # one launcher per node, each starting its own rank of a world of two
    for k in (0, 1):
        assert f"nnodes=2, num_local_procs=1, node_rank={k}" in log, log
    assert log.count("dist_world_size=2") == 2, log
    assert _complete(out, 6)
    assert max(max(v) for v in _scalars(out / "tensorboard").values()) == 6
