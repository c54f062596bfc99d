"""A throwaway single-node SLURM cluster on loopback, for the real-daemon tests.

Installs nothing. Needs the binaries of the Debian packages ``slurmctld slurmd munge``
(``slurm-client`` comes with them) and root (slurmd starts jobs as the submitting user and
``SlurmUser=root`` keeps everything in one account). Everything the daemons write - munge key,
sockets, state, spool, logs, pid files - lives in one temporary folder; the daemons run in the
foreground as child processes and are killed at teardown, so nothing is left behind and the
machine's own ``/etc/slurm`` and ``/etc/munge`` are never read or touched.

``slurm_cluster`` (session fixture) yields a :class:`SlurmCluster` with one node named like this
machine; ``slurm_cluster_2nodes`` one with nodes ``n1``, ``n2`` (two slurmd on 127.0.0.1, which
Debian's SLURM, built with multiple-slurmd support, allows). ``cluster.env`` holds ``SLURM_CONF``
for the test's commands (``sbatch``, ``scontrol``, ``linreg submit``). Run by hand to poke at it::

    python tests/slurm_cluster.py [NODES]   # starts the cluster, prints SLURM_CONF, waits for Ctrl-C
"""

from __future__ import annotations

import ctypes
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "srun")
PACKAGES = "slurmctld slurmd munge"  # Debian/Ubuntu packages that provide BINARIES


def _which(name: str) -> str | None:
    # the daemons live in /usr/sbin, which a non-login PATH may lack
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if _which(b) is None]


def why_unavailable() -> str | None:
    """A reason the cluster cannot start here, or None when it can."""
    missing = missing_binaries()
    if missing:
        return (
            f"SLURM test cluster: missing {', '.join(missing)}; install the Debian packages "
            f"`{PACKAGES}` (apt-get install -y {PACKAGES})"
        )
    if os.geteuid() != 0:
        return "SLURM test cluster: needs root (slurmd launches jobs and SlurmUser=root)"
    return None


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 2048


class SlurmCluster:
    """Handle on the running daemons; ``run`` executes a SLURM client command against them."""

    def __init__(self, root: Path, nodes: int = 1):
        self.root = root
        host = socket.gethostname().split(".")[0]
        # one node: the machine's own name; several: n1..nN, each its own slurmd on 127.0.0.1
        # (needs a SLURM built with --enable-multiple-slurmd, as Debian's is)
        self.nodes = [host] if nodes == 1 else [f"n{i + 1}" for i in range(nodes)]
        self.node = self.nodes[0]
        self.host = host
        self.cpus = 2
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ)
        self.env["SLURM_CONF"] = str(self.conf)
        self.env["MUNGE_SOCKET"] = str(self.munge_socket)
        sbin = "/usr/sbin:/usr/local/sbin:/sbin"
        self.env["PATH"] = self.env.get("PATH", "/usr/bin:/bin") + ":" + sbin
        # a SLURM job of the outer world (CI inside an allocation) must not leak into ours
        for k in list(self.env):
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
                del self.env[k]

    # ---------------------------------------------------------------- setup
    def write_config(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o755)  # clients need to reach the socket; the key itself is 0600
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        ctld_port, *slurmd_ports = _free_ports(1 + len(self.nodes))
        mem = max(256, min(_mem_mb() // (2 * len(self.nodes)), 8192))
        node_lines = [
            f"NodeName={n} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port={p} "
            f"CPUs={self.cpus} RealMemory={mem} State=UNKNOWN"
            for n, p in zip(self.nodes, slurmd_ports)
        ]
        self.conf.write_text(
            "\n".join(
                [
                    "# written by tests/slurm_cluster.py: single node on loopback, test-only",
                    "ClusterName=linregtest",
                    f"SlurmctldHost={self.host}(127.0.0.1)",
                    "MailProg=/bin/true",
                    f"SlurmctldPort={ctld_port}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool' / '%n'}",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd.%n.pid'}",
                    f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'log' / 'slurmd.%n.log'}",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "SchedulerType=sched/builtin",
                    "MpiDefault=none",
                    "SwitchType=switch/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "JobRequeue=1",
                    # job ids (and the batch script's rendezvous port, 10000 + id % 20000) differ
                    # between clusters that run at the same time on one machine
                    f"FirstJobId={random.randrange(1000, 19000)}",
                    # finished jobs stay visible to `scontrol show job` (no slurmdbd, no sacct)
                    "MinJobAge=86400",
                    "KillWait=5",
                    "ReturnToService=2",
                    "SlurmdTimeout=300",
                    "InactiveLimit=0",
                    *node_lines,
                    f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        log.close()

    def start(self, timeout: float = 60.0) -> None:
        self.write_config()
        m = self.root / "munge"
        self._spawn(
            "munged",
            [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
             f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
             f"--seed-file={m / 'munged.seed'}", f"--log-file={self.root / 'log' / 'munged.log'}",
             "--num-threads=2"],
        )
        self._wait(lambda: self.munge_socket.exists(), 20, "munged socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run(["scontrol", "ping"], check=False).returncode == 0, timeout,
                   "slurmctld to answer `scontrol ping`")
        for n in self.nodes:
            (self.root / "spool" / n).mkdir(parents=True, exist_ok=True)
            self._spawn(f"slurmd.{n}", [_which("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
        self._wait(self._nodes_idle, timeout, f"node(s) {','.join(self.nodes)} to become idle in sinfo")

    def _nodes_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.split()
        return len(out) == len(self.nodes) and all(s == "idle" for s in out)

    def _wait(self, cond, timeout: float, what: str) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}:\n"
                                       + self.logs())
            if cond():
                return
            time.sleep(0.3)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}:\n" + self.logs())

    # ---------------------------------------------------------------- use
    def run(self, argv: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(argv, env=kw.pop("env", self.env), capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        p = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if p.returncode != 0:
            return {}
        info = {}
        for m in re.finditer(r"(\w+(?:/\w+)?)=(\S*)", p.stdout):
            info.setdefault(m.group(1), m.group(2))
        return info

    def job_state(self, job_id: str) -> str:
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait_job(self, job_id: str, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED",
                 "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")) -> dict:
        """Poll until the job reaches one of ``states``; returns its final `job_info`."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1.0)
        raise TimeoutError(f"job {job_id} not finished after {timeout:.0f}s: {self.job_info(job_id)}\n"
                           + self.logs())

    def logs(self, tail: int = 30) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {f.name} ---\n" + "\n".join(lines))
        return "\n".join(out)

    # ---------------------------------------------------------------- teardown
    def stop(self) -> None:
        # cancel leftover jobs first so slurmd kills their processes
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "-u", "root"], check=False)
            time.sleep(0.5)
        names = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in names:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        # job processes are reparented away from slurmd; kill whatever still runs from our spool
        _kill_leftovers(self.root)
        self.procs.clear()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the test process dies without tearing down."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill_leftovers(root: Path) -> None:
    """Kill processes whose command line or cwd points into ``root`` (slurmstepd, job tasks)."""
    me = os.getpid()
    root_s = str(root)
    for pid_s in os.listdir("/proc"):
        if not pid_s.isdigit() or int(pid_s) == me:
            continue
        try:
            cmd = Path(f"/proc/{pid_s}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = Path(f"/proc/{pid_s}/environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if root_s in cmd or f"SLURM_CONF={root_s}" in env:
            try:
                os.kill(int(pid_s), signal.SIGKILL)
            except OSError:
                pass


def start_cluster(root: Path | None = None, nodes: int = 1) -> SlurmCluster:
    root = Path(root or tempfile.mkdtemp(prefix="linreg-slurm-"))
    cluster = SlurmCluster(root, nodes=nodes)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


try:
    import pytest
except ImportError:  # pragma: no cover - only for `python tests/slurm_cluster.py`
    pytest = None

def _fixture_cluster(nodes: int):
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    # short path: the munge socket path must fit in sun_path (108 bytes)
    root = Path(tempfile.mkdtemp(prefix="linreg-slurm-"))
    cluster = start_cluster(root, nodes=nodes)
    try:
        yield cluster
    finally:
        cluster.stop()
        if not os.environ.get("LINREG_KEEP_SLURM"):
            shutil.rmtree(root, ignore_errors=True)


if pytest is not None:

    @pytest.fixture(scope="session")
    def slurm_cluster():
        """One node (this machine's host name, 2 CPUs) on loopback."""
        yield from _fixture_cluster(1)

    @pytest.fixture(scope="module")
    def slurm_cluster_2nodes():
        """Two nodes n1, n2: two slurmd on loopback, 2 CPUs each (the CPUs are shared)."""
        yield from _fixture_cluster(2)


if __name__ == "__main__":
    reason = why_unavailable()
    if reason:
        sys.exit(reason)
    c = start_cluster(nodes=int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print(f"export SLURM_CONF={c.conf}\n(Ctrl-C stops the daemons)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
