"""A real one-node SLURM cluster on this machine, for tests of the workflow's SLURM profile.

Debian's `munge slurmctld slurmd slurm-client` (Slurm 22.05) run without systemd: the daemons start
in the foreground under their own session, their PIDs are recorded, and only those PIDs are stopped.
State and logs live in a temporary folder. The configuration is written to the default place,
/etc/slurm/slurm.conf, because snakemake's job-step executor strips SLURM_* variables (SLURM_CONF
included) before its inner `srun`; an existing file that this helper did not write is never replaced,
and the file is removed again at the end. No accounting daemon: `sacct` cannot work, so the profile
asks for `squeue` status queries.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# written by brightpaint tests/local_slurm.py"
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "srun")


def unavailable() -> str:
    """Why a local cluster cannot start here ("" when it can)."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if not shutil.which(name)]
    if missing:
        return f"SLURM programs missing: {missing} (Debian: munge slurmctld slurmd slurm-client)"
    if os.geteuid() != 0:
        return "the daemons need root (SlurmUser=root, /etc/slurm/slurm.conf)"
    if DEFAULT_CONF.exists() and MARKER not in DEFAULT_CONF.read_text(errors="replace"):
        return f"{DEFAULT_CONF} belongs to a real cluster; not replacing it"
    return ""


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def slurm_conf(folder: Path, cpus: int, memory_mb: int, ports: tuple[int, int]) -> str:
    return "\n".join([
        MARKER,
        "ClusterName=brightpaint-test",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        f"AuthInfo=socket={folder / 'munge.socket'}",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU_Memory",
        "MpiDefault=none",
        "ReturnToService=2",
        # finished jobs stay visible to squeue for 5 min: the profile's status queries rely on it
        "MinJobAge=300",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        "PartitionName=main Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


class LocalSlurm:
    """Start munged, slurmctld and slurmd (`with LocalSlurm(folder) as cluster:`); `cluster.env` is
    the environment clients and snakemake need; leaving the block stops the three daemons."""

    def __init__(self, folder: Path, cpus: int | None = None, memory_mb: int | None = None):
        self.folder = Path(folder)
        self.cpus = cpus or os.cpu_count() or 1
        total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        self.memory_mb = memory_mb or int(total_mb * 0.8)
        self.processes: dict[str, subprocess.Popen] = {}
        ports = next((a, a + 1) for a in range(16817, 17817, 2) if _port_free(a) and _port_free(a + 1))
        self.conf = DEFAULT_CONF
        self.folder.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir(exist_ok=True)
        self.text = slurm_conf(self.folder, self.cpus, self.memory_mb, ports)
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _start(self, name: str, command: list[str]) -> None:
        log = open(self.folder / f"{name}.out", "w")
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                env=self.env, start_new_session=True)

    def _client(self, *args: str) -> str:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=30).stdout

    def start(self, timeout: float = 60) -> LocalSlurm:
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        self.conf.parent.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.text)
        key = self.folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._start("munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                               f"--socket={self.folder / 'munge.socket'}",
                               f"--pid-file={self.folder / 'munged.pid'}",
                               f"--log-file={self.folder / 'munged.log'}",
                               f"--seed-file={self.folder / 'munged.seed'}"])
        self._wait(lambda: (self.folder / "munge.socket").exists(), timeout, "munged socket")
        self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: "main" in self._client("sinfo", "-h", "-o", "%P"), timeout, "slurmctld")
        self._start("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait(lambda: self._client("sinfo", "-h", "-N", "-o", "%t").strip() in ("idle", "mix"),
                   timeout, "slurmd (node idle)")
        return self

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in self.processes.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"SLURM daemon(s) exited while waiting for {what}: {dead}; "
                                   f"logs in {self.folder}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}; logs in {self.folder}")

    def stop(self) -> None:
        # reverse start order; only the processes this object started, by PID
        for name in reversed(list(self.processes)):
            process = self.processes.pop(name)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        if self.conf.exists() and MARKER in self.conf.read_text(errors="replace"):
            self.conf.unlink()

    def __enter__(self) -> LocalSlurm:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
