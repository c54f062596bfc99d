"""`linreg submit` without a cluster: the script --dry-run prints, the hostfile route, clear errors.

The real submission (sbatch, srun, requeue) is tested against running daemons in test_slurm.py.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from linreg import slurm

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "launch" / "slurm" / "pretrain.sbatch"
RECIPE = REPO / "recipes" / "tiny.yaml"


def _dry_run(capsys, *argv: str) -> str:
    rc = slurm.main(["--recipe", str(RECIPE), *argv, "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def _sbatch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def _error(capsys, *argv: str) -> str:
    rc = slurm.main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert err.startswith("error: "), err
    return err


def test_dry_run_fills_every_option(capsys, tmp_path):
    run = tmp_path / "run"
    text = _dry_run(
        capsys, "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "32", "--partition", "gpu",
        "--time", "1-00:00:00", "--account", "lab", "--qos", "high", "--job-name", "m150",
        "--output-dir", str(run), "--set", "train.steps=10", "--set", "regularizer.layers=[0, 1]",
        "--set", "train.micro_batch_size=1",  # 16 sequences over 2 x 8 ranks
        "--extra-sbatch=--constraint=h100", "--extra-sbatch", "exclusive", "--env", "NCCL_DEBUG=WARN",
        "--env", "NOTE=two words", "--setup", "source /opt/venv/bin/activate", "--port", "23456",
    )
    lines = _sbatch_lines(text)
    for want in ("--job-name=m150", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8",
                 "--cpus-per-task=32", "--partition=gpu", "--time=1-00:00:00", "--account=lab", "--qos=high",
                 f"--output={run}/slurm-%j.out", "--constraint=h100", "--exclusive",
                 "--requeue", "--open-mode=append", "--signal=B:USR1@120"):
        assert f"#SBATCH {want}" in lines, (want, lines)
    assert "export NCCL_DEBUG=WARN" in text
    assert "export NOTE='two words'" in text
    assert "\nsource /opt/venv/bin/activate\n" in text
    assert f"LINREG_OUTPUT_DIR={run}\n" in text
    assert "LINREG_GPUS_PER_NODE=8\n" in text
    assert "LINREG_MASTER_PORT=23456\n" in text
    set_line = next(line for line in text.splitlines() if line.startswith("set -- "))
    assert shlex.split(set_line)[2:] == ["--recipe", str(RECIPE), "--set", "train.steps=10",
                                         "--set", "regularizer.layers=[0, 1]", "--set", "train.micro_batch_size=1"]
    # all #SBATCH lines come before the first command, or sbatch ignores them
    first_cmd = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_cmd for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
    assert not run.exists(), "--dry-run must not write anything"
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_dry_run_keeps_the_template_verbatim_outside_the_blocks(capsys, tmp_path):
    text = _dry_run(capsys, "--output-dir", str(tmp_path / "run"))
    template = TEMPLATE.read_text()
    assert text.startswith(template.split("# >>> sbatch options")[0])
    assert text.endswith(template.split("# <<< settings")[1])
    between = template.split("# <<< sbatch options")[1].split("# >>> settings")[0]
    assert between in text
    assert "--resume auto" in text and "srun" in text and "--no_ssh" in text


def test_cpu_requests_no_gpus_and_default_output_dir_is_the_recipes(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = _dry_run(capsys, "--cpu", "--gpus-per-node", "2")
    lines = _sbatch_lines(text)
    assert not any("--gpus" in line for line in lines), lines
    assert "LINREG_GPUS_PER_NODE=2\n" in text
    # tiny.yaml: output_dir runs/{name}, name tiny, relative to where `linreg submit` runs
    assert f"#SBATCH --output={tmp_path}/runs/tiny/slurm-%j.out" in lines
    assert "#SBATCH --job-name=linreg-tiny" in lines
    # an output_dir override reaches the default run folder too
    text = _dry_run(capsys, "--set", f"output_dir={tmp_path}/elsewhere")
    assert f"#SBATCH --output={tmp_path}/elsewhere/slurm-%j.out" in _sbatch_lines(text)


def test_template_refuses_to_run_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.run(["bash", str(TEMPLATE), "--recipe", str(RECIPE)], env=env, cwd=tmp_path,
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert "inside a SLURM allocation" in p.stderr


def test_filled_script_refuses_a_resume_argument(tmp_path):
    """--resume is the script's business (always auto); a hand-written one is refused."""
    text = TEMPLATE.read_text()
    env = {**os.environ, "SLURM_JOB_ID": "7"}
    p = subprocess.run(["bash", "-s", "--", "--recipe", str(RECIPE), "--resume", "none"], input=text, text=True,
                       env=env, cwd=tmp_path, capture_output=True)
    assert p.returncode == 2
    assert "always uses --resume auto" in p.stderr


def test_errors_are_named(capsys, tmp_path, monkeypatch):
    err = _error(capsys, "--recipe", str(tmp_path / "missing.yaml"), "--dry-run")
    assert "--recipe: file not found" in err and "missing.yaml" in err
    err = _error(capsys, "--recipe", str(RECIPE), "--set", "train.stepz=3", "--dry-run")
    assert "stepz" in err
    err = _error(capsys, "--recipe", str(RECIPE), "--env", "1BAD=x", "--dry-run")
    assert "--env" in err
    err = _error(capsys, "--recipe", str(RECIPE), "--job-name", "two words", "--dry-run")
    assert "--job-name" in err and "whitespace" in err
    err = _error(capsys, "--recipe", str(RECIPE), "--nodes", "0", "--dry-run")
    assert "--nodes" in err
    err = _error(capsys, "--recipe", str(RECIPE), "--script", "launch/nope.py", "--dry-run")
    assert "launch/nope.py" in err
    err = _error(capsys, "--recipe", str(RECIPE), "--template", str(tmp_path / "none.sbatch"), "--dry-run")
    assert "template not found" in err
    # no sbatch on PATH: a clear error, and nothing written
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    run = tmp_path / "run"
    err = _error(capsys, "--recipe", str(RECIPE), "--output-dir", str(run))
    assert "'sbatch' not found on PATH" in err and "--dry-run" in err
    assert not run.exists()


def test_hostfile_route_writes_what_deepspeed_reads(capsys, tmp_path):
    from deepspeed.launcher.runner import fetch_hostfile

    capsys.readouterr()  # importing deepspeed prints an accelerator warning
    hostfile = tmp_path / "hostfile"
    run = tmp_path / "run"
    argv = ["--recipe", str(RECIPE), "--hostfile", str(hostfile), "--hosts", "gpu-a,gpu-b",
            "--gpus-per-node", "8", "--output-dir", str(run), "--port", "29512"]
    # tiny.yaml: 16 sequences in micro batches of 8 do not split over 2 hosts x 8 ranks
    err = _error(capsys, *argv)
    assert "2 node(s) x 8 rank(s) = 16 ranks" in err and "train.micro_batch_size=1" in err
    assert not hostfile.exists()
    rc = slurm.main(argv + ["--set", "train.micro_batch_size=1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert dict(fetch_hostfile(str(hostfile))) == {"gpu-a": 8, "gpu-b": 8}
    cmd = shlex.split(out.strip())
    assert cmd[:2] == ["deepspeed", "--hostfile"] and cmd[2] == str(hostfile)
    for flag, value in (("--num_nodes", "2"), ("--num_gpus", "8"), ("--master_addr", "gpu-a"),
                        ("--master_port", "29512"), ("--output-dir", str(run)), ("--resume", "auto"),
                        ("--recipe", str(RECIPE))):
        assert cmd[cmd.index(flag) + 1] == value, (flag, cmd)
    assert str(REPO / "launch" / "pretrain.py") in cmd
    err = _error(capsys, "--recipe", str(RECIPE), "--hostfile", str(hostfile))
    assert "--hosts" in err
    err = _error(capsys, "--recipe", str(RECIPE), "--hostfile", str(hostfile), "--hosts", "a,a")
    assert "twice" in err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        slurm.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--recipe", "--nodes", "--gpus-per-node", "--cpu", "--cpus-per-task", "--partition", "--time",
                "--account", "--qos", "--job-name", "--output-dir", "--set", "--extra-sbatch", "--env", "--setup",
                "--script", "--port", "--template", "--hostfile", "--hosts", "--dry-run"):
        assert opt in out, opt


def test_batch_geometry_is_checked_at_submit_time(capsys, tmp_path):
    """The loop's own check: 256 sequences of mistral-650m (micro batch 16) do not split over 4 x 8 ranks."""
    big = REPO / "recipes" / "mistral-650m.yaml"
    err = _error(capsys, "--recipe", str(big), "--nodes", "4", "--gpus-per-node", "8", "--output-dir",
                 str(tmp_path / "run"), "--dry-run")
    assert "4 node(s) x 8 rank(s) = 32 ranks" in err and "train.global_batch_size=256" in err
    assert "--set train.micro_batch_size=8" in err
    rc = slurm.main(["--recipe", str(big), "--nodes", "4", "--gpus-per-node", "8", "--output-dir", str(tmp_path / "run"),
                     "--set", "train.micro_batch_size=8", "--dry-run"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    err = _error(capsys, "--recipe", str(big), "--nodes", "3", "--gpus-per-node", "8", "--dry-run")
    assert "24 ranks do not divide the global batch" in err


def test_cpus_per_task_default_follows_the_ranks(capsys, tmp_path):
    run = str(tmp_path / "run")
    rc = slurm.main(["--recipe", str(RECIPE), "--gpus-per-node", "2", "--output-dir", run, "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"#SBATCH --cpus-per-task={2 * slurm.CPUS_PER_GPU}" in _sbatch_lines(out)
    assert f"requesting {2 * slurm.CPUS_PER_GPU} cores per node" in err
    text = _dry_run(capsys, "--cpu", "--gpus-per-node", "2", "--output-dir", run)
    assert "#SBATCH --cpus-per-task=2" in _sbatch_lines(text)
    text = _dry_run(capsys, "--gpus-per-node", "2", "--cpus-per-task", "5", "--output-dir", run)
    assert "#SBATCH --cpus-per-task=5" in _sbatch_lines(text)
