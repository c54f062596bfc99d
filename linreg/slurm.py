"""``linreg submit``: fill ``launch/slurm/pretrain.sbatch`` for a recipe and submit it with ``sbatch``.

The batch script is the single source of truth: this module only replaces its two marked blocks
(``#SBATCH`` options and settings) and keeps the rest verbatim, so ``--dry-run`` prints exactly
what would be submitted. The filled script is also saved in the run folder (``slurm-submit.sbatch``)
and the job's log goes to ``<run folder>/slurm-<jobid>.out`` (appended to on every requeue).

Without SLURM, ``--hostfile PATH --hosts a,b`` writes a DeepSpeed hostfile for those hosts and prints
the ``deepspeed`` command that starts the run on them over ssh (pdsh).
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from linreg.errors import ConfigError, LinregError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEMPLATE = REPO_ROOT / "launch" / "slurm" / "pretrain.sbatch"
DEFAULT_SCRIPT = "launch/pretrain.py"
SUBMITTED_NAME = "slurm-submit.sbatch"
CPUS_PER_GPU = 8  # default --cpus-per-task: cores per GPU rank (launcher, rank processes, data reads)
CPUS_PER_CPU_RANK = 1  # default --cpus-per-task with --cpu: cores per CPU rank

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SubmitError(LinregError):
    """The submission cannot be made (no sbatch, sbatch refused the job, template unusable)."""


@dataclass
class SubmitSpec:
    """Everything that goes into one filled batch script."""

    recipe: Path
    output_dir: Path
    nodes: int = 1
    gpus_per_node: int = 1
    cpu: bool = False
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    job_name: str = "linreg"
    sets: list[str] = field(default_factory=list)
    extra_sbatch: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    script: str = DEFAULT_SCRIPT
    root: Path = REPO_ROOT
    port: int | None = None

    @property
    def log_pattern(self) -> Path:
        return self.output_dir / "slurm-%j.out"

    def train_args(self) -> list[str]:
        args = ["--recipe", str(self.recipe)]
        for s in self.sets:
            args += ["--set", s]
        return args


# ----------------------------------------------------------------------------- script text
def _sbatch_value(name: str, value: object) -> str:
    text = str(value)
    if not text or re.search(r"\s", text):
        raise ConfigError(f"--{name}: {text!r} is empty or contains whitespace, which #SBATCH lines cannot carry")
    return text


def sbatch_lines(spec: SubmitSpec) -> list[str]:
    opts: list[tuple[str, object]] = [("job-name", spec.job_name), ("nodes", spec.nodes), ("ntasks-per-node", 1)]
    if not spec.cpu:
        opts.append(("gpus-per-node", spec.gpus_per_node))
    for name in ("cpus_per_task", "partition", "time", "account", "qos"):
        value = getattr(spec, name)
        if value is not None:
            opts.append((name.replace("_", "-"), value))
    opts.append(("output", spec.log_pattern))
    lines = [f"#SBATCH --{k}={_sbatch_value(k, v)}" for k, v in opts]
    for extra in spec.extra_sbatch:
        extra = extra.strip()
        if not extra or "\n" in extra:
            raise ConfigError(f"--extra-sbatch: {extra!r} must be one non-empty option such as --constraint=a100")
        lines.append("#SBATCH " + (extra if extra.startswith("-") else "--" + extra))
    return lines


def settings_lines(spec: SubmitSpec) -> list[str]:
    q = shlex.quote
    lines = [
        "# written by `linreg submit`",
        f"LINREG_ROOT={q(str(spec.root))}",
        f"LINREG_SCRIPT={q(spec.script)}",
        f"LINREG_OUTPUT_DIR={q(str(spec.output_dir))}",
        f"LINREG_GPUS_PER_NODE={spec.gpus_per_node}",
        f"LINREG_MASTER_PORT={'' if spec.port is None else spec.port}",
    ]
    for item in spec.env:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise ConfigError(f"--env: {item!r} must look like KEY=VALUE with KEY a shell variable name")
        lines.append(f"export {key}={q(value)}")
    lines += list(spec.setup)
    lines.append("# training arguments (replace the script's own)")
    lines.append("set -- " + " ".join(q(a) for a in spec.train_args()))
    return lines


def _replace_block(text: str, name: str, lines: list[str], template: Path) -> str:
    pattern = re.compile(rf"^# >>> {re.escape(name)}\b.*?\n(.*?)^# <<< {re.escape(name)}\b[^\n]*\n", re.M | re.S)
    m = pattern.search(text)
    if m is None:
        raise SubmitError(f"{template}: marked block '# >>> {name}' ... '# <<< {name}' not found")
    body = "".join(line + "\n" for line in lines)
    return text[: m.start(1)] + body + text[m.end(1) :]


def render_script(spec: SubmitSpec, template: Path = DEFAULT_TEMPLATE) -> str:
    """The batch script for ``spec``: ``template`` with its two marked blocks filled in."""
    if not template.is_file():
        raise SubmitError(
            f"batch script template not found: {template}; `linreg submit` needs a checkout of the "
            f"repository (launch/slurm/pretrain.sbatch) or --template PATH"
        )
    text = template.read_text()
    text = _replace_block(text, "sbatch options", sbatch_lines(spec), template)
    text = _replace_block(text, "settings", settings_lines(spec), template)
    return text


# ----------------------------------------------------------------------------- hostfile route
def write_hostfile(path: Path, hosts: list[str], slots: int) -> None:
    """A DeepSpeed hostfile (``host slots=N`` per line) for a cluster without SLURM."""
    if not hosts:
        raise ConfigError("--hostfile needs --hosts h1,h2,... (the machines to train on)")
    if len(set(hosts)) != len(hosts):
        raise ConfigError(f"--hosts: {','.join(hosts)} names a host twice")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{h} slots={slots}\n" for h in hosts))


def hostfile_command(spec: SubmitSpec, hostfile: Path, hosts: list[str]) -> list[str]:
    cmd = ["deepspeed", "--hostfile", str(hostfile), "--num_nodes", str(len(hosts)),
           "--num_gpus", str(spec.gpus_per_node), "--master_addr", hosts[0]]
    if spec.port is not None:
        cmd += ["--master_port", str(spec.port)]
    script = spec.script if Path(spec.script).is_absolute() else str(spec.root / spec.script)
    return cmd + [script] + spec.train_args() + ["--output-dir", str(spec.output_dir), "--resume", "auto"]


# ----------------------------------------------------------------------------- sbatch
def find_sbatch(sbatch: str = "sbatch") -> str:
    exe = shutil.which(sbatch)
    if exe is None:
        raise SubmitError(
            f"{sbatch!r} not found on PATH: run `linreg submit` where the SLURM client commands are "
            f"installed (a login node), use --dry-run to print the script, or --hostfile without SLURM"
        )
    return exe


def submit(script_path: Path, sbatch: str = "sbatch") -> str:
    """``sbatch --parsable SCRIPT``; returns the job id."""
    exe = find_sbatch(sbatch)
    p = subprocess.run([exe, "--parsable", str(script_path)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SubmitError(f"sbatch refused the job (exit {p.returncode}): {(p.stderr or p.stdout).strip()}")
    job_id = p.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SubmitError(f"sbatch printed no job id: {p.stdout!r} {p.stderr!r}")
    return job_id


# ----------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="linreg submit",
        description=(
            "Fill launch/slurm/pretrain.sbatch for a recipe and submit it with `sbatch --parsable`; prints "
            "the job id. The job starts one DeepSpeed launcher per node with srun (no ssh), always passes "
            "--resume auto (a requeued or preempted job continues from its newest checkpoint) and logs to "
            "OUTPUT_DIR/slurm-JOBID.out."
        ),
    )
    p.add_argument("--recipe", required=True, help="recipe YAML file (validated before submitting)")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=1,
                   help="DeepSpeed ranks per node: GPUs requested per node, or CPU ranks with --cpu (default 1)")
    p.add_argument("--cpu", action="store_true",
                   help="request no GPUs (no --gpus-per-node for SLURM); ranks run on CPU over gloo")
    p.add_argument("--cpus-per-task", type=int,
                   help=f"CPU cores per node for the launcher and its ranks (default: {CPUS_PER_GPU} per GPU, "
                        f"with --cpu {CPUS_PER_CPU_RANK} per rank; one task runs per node, so SLURM's own default "
                        f"would be a single core for the whole node)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--time", help="time limit, e.g. 2-00:00:00 or 04:00:00; the job requeues itself 120 s before it")
    p.add_argument("--account", help="SLURM account to charge")
    p.add_argument("--qos", help="SLURM quality of service")
    p.add_argument("--job-name", help="job name (default: linreg-<recipe file stem>)")
    p.add_argument("--output-dir",
                   help="run folder (default: the recipe's output_dir, relative to the current directory); "
                        "holds checkpoints, TensorBoard, the SLURM log and the submitted script")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="recipe override passed through to the training script (repeatable)")
    p.add_argument("--extra-sbatch", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH option, e.g. --extra-sbatch=--constraint=h100 or exclusive (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable exported in the job before launching (repeatable)")
    p.add_argument("--setup", action="append", default=[], metavar="SHELL",
                   help="shell line run in the job before launching, e.g. 'source .venv/bin/activate' (repeatable)")
    p.add_argument("--script", default=DEFAULT_SCRIPT,
                   help=f"training script, relative to the repository or absolute (default {DEFAULT_SCRIPT})")
    p.add_argument("--port", type=int, help="rendezvous port (default: 10000 + job id mod 20000)")
    p.add_argument("--template", type=Path, default=DEFAULT_TEMPLATE, help="batch script template (default: %(default)s)")
    p.add_argument("--hostfile", type=Path,
                   help="no SLURM: write a DeepSpeed hostfile for --hosts to this path and print the deepspeed "
                        "command that launches the run over ssh; nothing is submitted")
    p.add_argument("--hosts", help="comma-separated host names for --hostfile, the first one is the master")
    p.add_argument("--dry-run", action="store_true", help="print the batch script that would be submitted; no sbatch call, no files written")
    return p


def default_cpus_per_task(gpus_per_node: int, cpu: bool) -> int:
    return gpus_per_node * (CPUS_PER_CPU_RANK if cpu else CPUS_PER_GPU)


def check_batch_geometry(recipe, nodes: int, ranks_per_node: int) -> None:
    """The training loop's own check (global batch = micro batch x ranks x accumulation), at submit time."""
    from linreg.dsconfig import batch_geometry

    world = nodes * ranks_per_node
    try:
        batch_geometry(recipe.train.global_batch_size, recipe.train.micro_batch_size, world)
    except ConfigError as exc:
        per_rank, rest = divmod(recipe.train.global_batch_size, world)
        fits = [] if rest else [m for m in range(1, recipe.train.micro_batch_size + 1) if per_rank % m == 0]
        hint = (f"; with {world} ranks e.g. --set train.micro_batch_size={fits[-1]}" if fits else
                f"; {world} ranks do not divide the global batch: change --nodes/--gpus-per-node or "
                f"train.global_batch_size")
        raise ConfigError(f"{nodes} node(s) x {ranks_per_node} rank(s) = {world} ranks: {exc}{hint}") from None


def build_spec(args: argparse.Namespace) -> SubmitSpec:
    recipe = Path(args.recipe).expanduser()
    if not recipe.is_file():
        raise ConfigError(f"--recipe: file not found: {args.recipe}")
    for name in ("nodes", "gpus_per_node", "cpus_per_task", "port"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be a positive integer, got {value}")
    if args.port is not None and args.port > 65535:
        raise ConfigError(f"--port: {args.port} is not a TCP port")
    for s in args.sets:
        if "=" not in s:
            raise ConfigError(f"--set {s!r} must look like section.key=value")
    from linreg.config import load_recipe

    loaded = load_recipe(recipe, args.sets)  # refuse a bad recipe now, not after hours in the queue
    hosts = [h for h in (args.hosts or "").split(",") if h.strip()] if args.hostfile is not None else []
    check_batch_geometry(loaded, len(hosts) or args.nodes, args.gpus_per_node)
    cpus = args.cpus_per_task or default_cpus_per_task(args.gpus_per_node, args.cpu)
    script = args.script
    root = REPO_ROOT
    script_path = Path(script) if Path(script).is_absolute() else root / script
    if not script_path.is_file():
        raise ConfigError(f"--script: training script not found: {script_path}")
    return SubmitSpec(
        recipe=recipe.resolve(),
        output_dir=Path(args.output_dir or loaded.run_dir).expanduser().resolve(),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpu=args.cpu,
        cpus_per_task=cpus,
        partition=args.partition,
        time=args.time,
        account=args.account,
        qos=args.qos,
        job_name=args.job_name or f"linreg-{recipe.stem}",
        sets=list(args.sets),
        extra_sbatch=list(args.extra_sbatch),
        env=list(args.env),
        setup=list(args.setup),
        script=script,
        root=root,
        port=args.port,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        spec = build_spec(args)
        if args.hostfile is not None:
            hosts = [h.strip() for h in (args.hosts or "").split(",") if h.strip()]
            if not hosts:
                raise ConfigError("--hostfile needs --hosts h1,h2,... (the machines to train on)")
            if args.nodes not in (1, len(hosts)):
                raise ConfigError(f"--nodes {args.nodes} but --hosts names {len(hosts)} host(s)")
            cmd = shlex.join(hostfile_command(spec, args.hostfile, hosts))
            if args.dry_run:
                print(f"# {args.hostfile}")
                print("".join(f"# {h} slots={spec.gpus_per_node}\n" for h in hosts), end="")
                print(cmd)
                return 0
            write_hostfile(args.hostfile, hosts, spec.gpus_per_node)
            print(f"wrote {args.hostfile} ({len(hosts)} hosts x {spec.gpus_per_node} slots); launch with:",
                  file=sys.stderr)
            print(cmd)
            return 0
        if args.hosts:
            raise ConfigError("--hosts only goes with --hostfile (SLURM picks the nodes itself)")
        text = render_script(spec, args.template)
        if not args.dry_run:
            find_sbatch()  # before anything is written
        if args.cpus_per_task is None:
            per = f"{CPUS_PER_CPU_RANK} per CPU rank" if spec.cpu else f"{CPUS_PER_GPU} per GPU"
            print(f"note: no --cpus-per-task given: requesting {spec.cpus_per_task} cores per node ({per})",
                  file=sys.stderr)
        if args.dry_run:
            sys.stdout.write(text)
            return 0
        spec.output_dir.mkdir(parents=True, exist_ok=True)  # SLURM cannot create the log's folder
        script_path = spec.output_dir / SUBMITTED_NAME
        script_path.write_text(text)
        job_id = submit(script_path)
        print(job_id)
        print(f"submitted job {job_id}: {spec.nodes} node(s) x {spec.gpus_per_node} rank(s), "
              f"{spec.cpus_per_task} cores per node; "
              f"log {spec.output_dir}/slurm-{job_id}.out", file=sys.stderr)
        return 0
    except LinregError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
