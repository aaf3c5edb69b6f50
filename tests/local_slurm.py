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

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
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


# --- reruns of a finished run through the SLURM profile -----------------------------------------

def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under `folder`: (mtime in ns, sha256)."""
    state = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            state[str(path.relative_to(folder))] = (path.stat().st_mtime_ns,
                                                    hashlib.sha256(path.read_bytes()).hexdigest())
    return state


class SlurmRerun:
    """A copy of a finished run (snakemake's metadata included, modification times kept) with
    snapshots of its plates' and models' files, and a `snakemake --profile slurm` started in it in
    the background; `wait()` gives its CompletedProcess."""

    def __init__(self, cluster: LocalSlurm, snakefile: Path, profile: Path, source: Path,
                 run: Path, args: list[str], timeout: int, watch: tuple[str, ...] = ()):
        shutil.copytree(source, run, dirs_exist_ok=True, symlinks=True,
                        ignore=shutil.ignore_patterns("locks", "incomplete", "slurm_logs"))
        results = run / "results"
        self.run = run
        self.plates = {p.name: snapshot(p) for p in (results / "plates").iterdir()}
        self.models = snapshot(results / "models") if (results / "models").is_dir() else {}
        # modification times (ns) of the files in `watch` before the rerun
        self.mtimes_before = {name: (run / name).stat().st_mtime_ns for name in watch}
        self.command = ["timeout", "-k", "30", str(timeout),
                        str(Path(sys.executable).with_name("snakemake")), "-s", str(snakefile),
                        "--profile", str(profile), *args,
                        # The plugin's first wait after a finished job (default 40 s), then 10 s more
                        # per check that finds none finished. A test job takes 15-25 s (snakemake's
                        # start-up in the job, then the script): checks at 8, 26, 54 s catch most at
                        # 26 s; with 3 s (checks at 3, 16, 39 s) each stage waited ~20 s for its check.
                        "--slurm-init-seconds-before-status-checks", "8",
                        # the plugin deletes a successful job's SLURM log by default; tests read them
                        "--slurm-keep-successful-logs"]
        self._output = {name: open(run.parent / f"{run.name}.{name}", "w+")
                        for name in ("stdout", "stderr")}
        # its own process group: stop() ends snakemake and what it started, whatever the test did
        self.process = subprocess.Popen(self.command, cwd=run, stdout=self._output["stdout"],
                                        stderr=self._output["stderr"], text=True,
                                        env={**cluster.env, "OMP_NUM_THREADS": "1"},
                                        start_new_session=True)
        self._result: subprocess.CompletedProcess | None = None

    def stop(self) -> None:
        """End the run if it still runs (a session that never waited for it)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.process.poll() is not None:
                return
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def wait(self) -> subprocess.CompletedProcess:
        if self._result is None:
            code = self.process.wait()
            text = {}
            for name, handle in self._output.items():
                handle.seek(0)
                text[name] = handle.read()
                handle.close()
            self._result = subprocess.CompletedProcess(self.command, code, text["stdout"],
                                                       text["stderr"])
        return self._result
