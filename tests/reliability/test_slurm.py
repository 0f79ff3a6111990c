"""``scripts/slurm.sbatch`` under a real Slurm: a ``slurmctld`` and two ``slurmd`` (two nodes, one worker each) on
this machine, with their own ``munged``, generated ``slurm.conf`` and state in a temporary directory.

A job pre-empted mid-run the way Slurm does it (USR1 to the batch shell: ``scancel --batch --signal=USR1``, what
``#SBATCH --signal=B:USR1@180`` sends before the time limit) stops at a step boundary with a checkpoint, requeues
itself, comes back as attempt 2 of the same job id, resumes at that step and ends with the export of an
uninterrupted run (plain torchrun, outside Slurm) byte for byte, with one pretrain record. A job cancelled with
``scancel`` checkpoints too but stays cancelled.

Two nodes on one host need a Slurm built with ``--enable-multiple-slurmd``; Debian 12's ``slurm-wlm`` (22.05) is
(``scontrol show config``: ``MULTIPLE_SLURMD = Yes``). A build without it gets one node with two workers instead.
Slurm delays a requeued job's start by 120 s (its EligibleTime); the test moves it to 3 s after the requeue
(``scontrol update StartTime=now``; sooner, within the second the old attempt's credential was revoked in, the
start fails with "Job credential revoked").

Needs ``slurm-wlm`` and ``munge``: installed with apt-get when absent (as root); without root or apt the test is
skipped, except under ``CI=true``, where it fails. The daemons, and every process that carries this cluster's
``SLURM_CONF`` (job steps, torchrun, workers), are stopped by pid when the module ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from repro.checkpoint import CHECKPOINT, load_checkpoint
from repro.export import EXPORT_WEIGHTS
from repro.records import read_records
from tests.conftest import ROOT
from tests.reliability.conftest import read_metrics, run_dir, sets, subprocess_env
from tests.reliability.test_distributed import free_port

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "scripts" / "slurm.sbatch"
STEPS = 150
"""About 0.1 s a step with two workers on two cores: ~15 s of training after ~20 s of start-up."""
SIGNAL_AT = 10
"""Pre-empt once this many steps are logged."""
RECORDS = Path("records") / "builtin-shapes.jsonl"
SBIN = os.pathsep.join(["/usr/sbin", "/usr/bin", "/sbin", "/bin", os.environ.get("PATH", "")])
BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")


def which(name: str) -> str | None:
    return shutil.which(name, path=SBIN)


def ensure_slurm() -> None:
    """Install slurm-wlm and munge with apt-get when a binary is missing; skip (fail under CI=true) if that can't."""
    if all(which(b) for b in BINARIES):
        return
    why = ""
    if os.geteuid() != 0:
        why = "not root"
    elif not which("apt-get"):
        why = "no apt-get"
    else:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        lock = ["-o", "DPkg::Lock::Timeout=300"]
        for cmd in (["apt-get", *lock, "update", "-qq"],
                    ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]):
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if p.returncode != 0:
                why = f"`{' '.join(cmd)}` failed ({p.returncode}): {(p.stdout + p.stderr)[-1500:]}"
                break
        missing = [b for b in BINARIES if not which(b)]
        if not why and missing:
            why = f"installed, but {missing} are still missing"
    if why:
        msg = f"needs slurm-wlm and munge, and could not install them: {why}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


@dataclass
class Cluster:
    base: Path
    nodes: list[str]
    env: dict[str, str]
    cpus: int = 1
    """CPUs a node has (what ``slurmd -C`` finds on this machine; every node has them all)."""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.base / "slurm.conf"

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        p = subprocess.run([which(cmd[0]) or cmd[0], *cmd[1:]], env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if check:
            assert p.returncode == 0, f"{' '.join(cmd)}: {p.returncode}\n{p.stdout}{p.stderr}\n{self.logs()}"
        return p.stdout

    def start(self, name: str, *cmd: str) -> None:
        log = open(self.base / "log" / f"{name}.out", "w")  # noqa: SIM115
        self.procs[name] = subprocess.Popen([which(cmd[0]) or cmd[0], *cmd[1:]], env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, cwd=self.base)

    def logs(self, n: int = 3000) -> str:
        return "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}\n"
                       for p in sorted((self.base / "log").glob("*")) if p.is_file())

    def job(self, job_id: str, key: str) -> str:
        text = self.run("scontrol", "-o", "show", "job", job_id)
        m = re.search(rf"\b{key}=(\S*)", text)
        assert m, text
        return m.group(1)

    def submit(self, cwd: Path, *args: str, **env: str) -> str:
        p = subprocess.run([which("sbatch") or "sbatch", "--parsable", *args], cwd=cwd, capture_output=True,
                           text=True, env={**job_env(), **self.env, **env}, timeout=60)
        assert p.returncode == 0, p.stderr
        return p.stdout.strip().split(";")[0]

    def stop(self) -> None:
        """Every job killed, every daemon stopped, then any process still carrying this SLURM_CONF: by pid."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                for j in self.run("squeue", "-h", "-o", "%i", check=False).split():
                    self.run("scancel", "--signal=KILL", "--full", j, check=False)
                    self.run("scancel", j, check=False)
                end = time.monotonic() + 30
                while self.run("squeue", "-h", check=False).strip() and time.monotonic() < end:
                    time.sleep(0.5)
        for name in [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=15)
        for pid in cluster_pids(self.conf) if self.nodes else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def cluster_pids(conf: Path) -> list[int]:
    """Processes whose environment names this cluster's slurm.conf (slurmstepd, the job's shells and workers)."""
    mark = f"SLURM_CONF={conf}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):
                if mark in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
    return pids


def job_env() -> dict[str, str]:
    """This process's environment for a job, without an enclosing Slurm job's SLURM_* variables."""
    return {k: v for k, v in subprocess_env().items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}


def slurm_conf(base: Path, nodes: list[str], host: str, cpus: int, memory: int) -> str:
    ports = {n: free_port() for n in nodes}
    lines = [
        "ClusterName=repro-test",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={ports[nodes[0]]}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={base / 'munge' / 'socket'}",
        f"StateSaveLocation={base / 'state'}",
        f"SlurmdSpoolDir={base / 'spool'}/%n",
        f"SlurmctldPidFile={base / 'slurmctld.pid'}",
        f"SlurmdPidFile={base}/slurmd-%n.pid",
        f"SlurmctldLogFile={base / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={base / 'log'}/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",  # no cgroups in a container
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/builtin",
        "SwitchType=switch/none",
        "MpiDefault=none",
        "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobRequeue=1",
        "ReturnToService=2",
        "KillWait=30",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        *(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[n]} CPUs={cpus} "
          f"RealMemory={memory} State=UNKNOWN" for n in nodes),
        "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


def wait_for(cond: Callable[[], bool], what: str, timeout: float, on_fail: Callable[[], str] = str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out after {timeout:.0f}s waiting for {what}\n{on_fail()}"
        time.sleep(0.25)


def boot(base: Path, nodes: list[str]) -> Cluster:
    host = socket.gethostname().split(".")[0]
    out = subprocess.run([which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=60).stdout
    cpus, memory = (re.search(rf"\b{k}=(\d+)", out) for k in ("CPUs", "RealMemory"))
    assert cpus and memory, out
    cluster = Cluster(base, nodes, {**job_env(), "PATH": SBIN, "SLURM_CONF": str(base / "slurm.conf")},
                      int(cpus.group(1)))
    cluster.conf.write_text(slurm_conf(base, nodes, host, cluster.cpus, int(memory.group(1))))
    for name in ("state", "log", *(f"spool/{n}" for n in nodes)):
        (base / name).mkdir(parents=True, exist_ok=True)
    cluster.start("slurmctld", "slurmctld", "-D", "-i", "-f", str(cluster.conf))
    for n in nodes:
        cluster.start(f"slurmd-{n}", "slurmd", "-D", "-f", str(cluster.conf), "-N", n)

    def idle() -> bool:
        for name, p in cluster.procs.items():
            assert p.poll() is None, f"{name} exited ({p.returncode})\n{cluster.logs()}"
        states = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).split()
        return states.count("idle") == len(nodes)

    wait_for(idle, f"{len(nodes)} idle node(s)", 60, cluster.logs)
    return cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    t0 = time.monotonic()
    ensure_slurm()
    installed = time.monotonic()
    # munged wants its socket's directory (and every one above it) searchable by all: not under pytest's 0700 tmp
    base = Path(tempfile.mkdtemp(prefix="repro-slurm-"))
    base.chmod(0o755)
    (base / "munge").mkdir(mode=0o755)
    (base / "log").mkdir()
    key = base / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge = Cluster(base, [], {**job_env(), "PATH": SBIN})  # holds munged, which outlives a restarted cluster
    clusters = [munge]
    try:
        sock = base / "munge" / "socket"
        munge.start("munged", "munged", "-F", f"--socket={sock}", f"--key-file={key}",
                    f"--log-file={base / 'log' / 'munged.log'}", f"--pid-file={base / 'munge' / 'pid'}",
                    f"--seed-file={base / 'munge' / 'seed'}")
        wait_for(lambda: sock.exists() or munge.procs["munged"].poll() is not None, "munged", 30, munge.logs)
        assert munge.procs["munged"].poll() is None, munge.logs()
        c = boot(base, ["n1", "n2"])
        clusters.append(c)
        if "MULTIPLE_SLURMD" not in c.run("scontrol", "show", "config"):  # one slurmd per host: one node
            c.stop()
            c = boot(base, ["n1"])
            clusters.append(c)
        print(f"\nslurm: install {installed - t0:.1f}s, daemons up in {time.monotonic() - installed:.1f}s "
              f"({len(c.nodes)} node(s))")
        yield c
    finally:
        for c in reversed(clusters):
            c.stop()
        shutil.rmtree(base, ignore_errors=True)


def run_args(out: Path, results: Path) -> list[str]:
    return ["micl", "--budget", f"{STEPS}steps", "--evals", "none", "--no-progress", "--no-report", "--out", str(out),
            "--results", str(results), *sets(train__log_every=1)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run uninterrupted, outside Slurm: one torchrun with two workers."""
    base = tmp_path_factory.mktemp("slurm-reference")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "repro.run", *run_args(base / "runs", base / "results")]
    p = subprocess.run(cmd, cwd=base, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir(base / "runs")


def submit(cluster: Cluster, tmp: Path) -> str:
    """scripts/slurm.sbatch for run_args on every node, one worker a node (two workers in all)."""
    per_node = str(2 // len(cluster.nodes))
    return cluster.submit(tmp, "--nodes", str(len(cluster.nodes)), "--gpus-per-node=0",
                          f"--cpus-per-task={cluster.cpus}", str(SCRIPT), *run_args(tmp / "runs", tmp / "results"),
                          PYTHON=sys.executable, NPROC_PER_NODE=per_node)


def logged(tmp: Path) -> int:
    ms = list((tmp / "runs").glob("*/micl/*/metrics.jsonl"))
    return ms[0].read_text().count("\n") if ms else 0


def losses(d: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(d / "metrics.jsonl")}


def test_a_preempted_job_requeues_resumes_and_ends_with_the_uninterrupted_export(cluster, reference, tmp_path):
    job = submit(cluster, tmp_path)
    out = tmp_path / f"slurm-{job}.out"

    def diag() -> str:
        return f"--- {out.name}\n{out.read_text()[-4000:] if out.exists() else '(none)'}\n{cluster.logs()}"

    def running_and_logged() -> bool:
        assert cluster.job(job, "JobState") in ("PENDING", "CONFIGURING", "RUNNING"), diag()
        return logged(tmp_path) >= SIGNAL_AT

    wait_for(running_and_logged, f"{SIGNAL_AT} logged steps", 300, diag)
    cluster.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@180 sends

    wait_for(lambda: cluster.job(job, "Restarts") == "1" and cluster.job(job, "JobState") == "PENDING",
             "the job to requeue", 180, diag)
    d = run_dir(tmp_path / "runs")
    state = load_checkpoint(d / CHECKPOINT)
    assert not state["complete"] and SIGNAL_AT <= state["step"] < STEPS, (state["step"], diag())
    assert not (d / EXPORT_WEIGHTS).exists()
    wait_for(lambda: not cluster_pids_of(cluster, job), "the first attempt's processes to end", 60, diag)

    # Slurm holds a requeued job back 120 s; the test starts it sooner, but not within the second its old credential
    # was revoked in (a start then fails: "Killing non-startable batch job: Job credential revoked")
    time.sleep(3)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    wait_for(lambda: cluster.job(job, "JobState") not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"),
             "the requeued job to end", 420, diag)

    text = out.read_text()
    assert cluster.job(job, "JobState") == "COMPLETED" and cluster.job(job, "ExitCode") == "0:0", diag()
    assert "attempt 1," in text and "attempt 2," in text and "attempt 3," not in text, diag()
    stops = [ln for ln in text.splitlines() if ln.startswith("repro: stopped by SIGTERM at step")]
    # both workers, at one boundary: the step the checkpoint holds, where attempt 2 resumes
    assert len(stops) == 2 and len(set(stops)) == 1 and f"at step {state['step']};" in stops[0], diag()
    assert f"resuming micl at step {state['step']}/{STEPS}" in text, diag()
    assert "Traceback" not in text.split("attempt 2,")[1], diag()

    assert (d / EXPORT_WEIGHTS).read_bytes() == (reference / EXPORT_WEIGHTS).read_bytes()
    assert losses(d) == losses(reference) and len(losses(d)) == STEPS
    recs, problems = read_records(tmp_path / "results" / RECORDS)
    assert not problems and [(r.status, r.eval, r.steps) for r in recs] == [("ok", "pretrain", STEPS)], recs


def cluster_pids_of(cluster: Cluster, job: str) -> list[int]:
    """Live processes of one job (their environment names its id)."""
    mark = f"SLURM_JOB_ID={job}".encode()
    pids = []
    for pid in cluster_pids(cluster.conf):
        with contextlib.suppress(OSError):
            if mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                pids.append(pid)
    return pids


def test_a_cancelled_job_checkpoints_and_stays_cancelled(cluster, tmp_path):
    job = submit(cluster, tmp_path)
    out = tmp_path / f"slurm-{job}.out"

    def diag() -> str:
        return f"--- {out.name}\n{out.read_text()[-4000:] if out.exists() else '(none)'}\n{cluster.logs()}"

    wait_for(lambda: logged(tmp_path) >= 3, "3 logged steps", 300, diag)
    cluster.run("scancel", job)  # SIGTERM to every process of the job, SIGKILL KillWait (30 s) later
    wait_for(lambda: cluster.job(job, "JobState") not in ("RUNNING", "COMPLETING"), "the job to end", 120, diag)
    time.sleep(3)  # a requeue would show by now
    assert cluster.job(job, "JobState") == "CANCELLED" and cluster.job(job, "Restarts") == "0", diag()
    text = out.read_text()
    assert text.count("repro: stopped by SIGTERM at step") == 2, diag()
    state = load_checkpoint(run_dir(tmp_path / "runs") / CHECKPOINT)
    assert not state["complete"] and 3 <= state["step"] < STEPS
