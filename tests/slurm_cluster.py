"""A private single-node SLURM cluster for tests: the `slurm_cluster` fixture.

Needs Debian's `slurm-wlm` and `munge` packages (`apt-get install -y slurm-wlm munge`, Slurm
22.05); without them the fixture skips with that command as the reason. It starts, as the
current user, its own `munged` (own key and socket), `slurmctld` and `slurmd` with their own
`slurm.conf` (passed through `SLURM_CONF`), state directories under one temporary directory and
free ports, so it never touches a system cluster or another test's cluster. Start-up takes about
a second; it waits until `sinfo` shows the node idle. `stop()` cancels this cluster's jobs, then
ends exactly the processes it started (by PID) and any job process that still carries this
cluster's `SLURM_CONF` in its environment.

Use it from a test::

    from slurm_cluster import slurm_cluster_fixture  # noqa: F401  (registers `slurm_cluster`)

    @pytest.mark.slurm
    def test_sweep(slurm_cluster, tmp_path):
        proc = slurm_cluster.run(["sbatch", "--parsable", "-o", str(tmp_path / "out"), "--wrap", "hostname"])
        job = proc.stdout.strip()
        assert slurm_cluster.wait_job(job) == "COMPLETED", slurm_cluster.logs()
        # any subprocess that talks to the cluster (klbench -m, a Hydra app) gets .env:
        subprocess.run([sys.executable, "-m", "klbench", "run", "-m", "hydra/launcher=slurm_cpu"],
                       env=slurm_cluster.env, check=True)

What the fixture yields (a `SlurmCluster`):

* `.env` - environment for subprocesses: `os.environ` as it is at that moment, without
  SLURM_*/SBATCH_* variables of an enclosing allocation, plus `.env_overrides` (`SLURM_CONF`,
  `MUNGE_SOCKET`, and `KLBENCH_SLURM_PARTITION`, which the conf/hydra/launcher presets read) and
  `PATH` with the `sacct` stand-in first (tests/slurm/sacct: submitit polls sacct and this
  cluster has no slurmdbd), then the running Python's bin directory. Jobs inherit it (sbatch
  exports the caller's environment): that is how submitit's `scontrol requeue` inside a job
  finds this cluster. `os.environ` itself is never changed; to drive submitit in-process, set
  `.env_overrides` and `PATH=.env["PATH"]` with monkeypatch.setenv.
* `.partition` (default partition, no time limit), `.cpus` (CPUs the node offers; default
  `max(2, os.cpu_count())`), `.gpus` (fake `gpu` GRES count; 0 = none), `.node`, `.root`.
* `.run(cmd, check=True, timeout=60, **subprocess_kwargs)` - run a command (list or shell
  string) with `.env`; returns the CompletedProcess and raises with stdout, stderr and the daemon
  logs on failure. Give sbatch `-o`: its default `slurm-%j.out` lands in the caller's cwd.
* `.wait_job(job_id, timeout=60)` - poll until a job leaves the pending/running states and
  return its final state (`COMPLETED`, `FAILED`, ...); `.job_states(job_id)` lists them now.
* `.logs(lines=60)` - the tail of the munged/slurmctld/slurmd logs, for assertion messages.

Jobs run as the current user with the environment of the submitting process; the job's Python
imports packages by name, so the package under test must be installed in that interpreter.
The cluster is shared by the whole test session (one start, however many modules import the
fixture). Set KLBENCH_SLURM_KEEP=1 to keep the state directory (config, logs) after the run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

INSTALL_HINT = "slurm-wlm/munge not installed: apt-get install slurm-wlm munge"
SACCT_STANDIN = Path(__file__).resolve().parent / "slurm" / "sacct"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")
# Job states after which a job will not run again (without an explicit requeue).
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED",
}  # fmt: skip


class SlurmUnavailable(RuntimeError):
    """The slurm/munge executables are missing (the fixture turns this into a skip)."""


class _DaemonExited(RuntimeError):
    """A daemon died during start-up (the message carries the logs)."""


def _which(name: str) -> str | None:
    # Daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


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


def _die_with_parent() -> None:
    """In the forked daemon: get SIGTERM when the test process dies without calling stop()."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def _mem_mb() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)


class SlurmCluster:
    """One slurmctld + one slurmd + one munged, private to this process."""

    def __init__(
        self,
        cpus: int | None = None,
        gpus: int = 2,
        partition: str = "klbench",
        start_timeout: float = 30.0,
    ) -> None:
        self.cpus = cpus or max(2, os.cpu_count() or 1)
        self.gpus = gpus
        self.partition = partition
        self.start_timeout = start_timeout
        self.node = socket.gethostname().split(".")[0]
        self.root: Path | None = None
        self.munge_socket = ""
        self.startup_s: float | None = None
        # What .env adds to os.environ (read by the helpers that merge it themselves).
        self.env_overrides: dict[str, str] = {}
        self._bin_dir = ""
        self._procs: dict[str, subprocess.Popen] = {}
        self._bins: dict[str, str] = {}

    # ------------------------------------------------------------------ start
    def start(self) -> SlurmCluster:
        missing = [n for n in DAEMONS + CLIENTS if _which(n) is None]
        if missing:
            raise SlurmUnavailable(f"{INSTALL_HINT} (missing: {', '.join(missing)})")
        self._bins = {n: _which(n) for n in DAEMONS + CLIENTS}  # type: ignore[misc]
        t0 = time.monotonic()
        for attempt in range(3):
            # A short path: the munge socket path must fit in sockaddr_un (108 bytes).
            self.root = Path(tempfile.mkdtemp(prefix="klslurm-", dir="/tmp"))
            try:
                self._write_files()
                self._start_daemons()
                self._wait_ready()
                break
            except _DaemonExited:
                # Most likely a port taken between choosing it and binding it: retry on new ports.
                self.stop()
                if attempt == 2:
                    raise
            except BaseException:
                self.stop()
                raise
        self.startup_s = time.monotonic() - t0
        return self

    @property
    def env(self) -> dict[str, str]:
        """os.environ (as it is now) plus this cluster's variables: pass it to subprocesses."""
        env = {
            k: v
            for k, v in os.environ.items()
            # Variables of an enclosing allocation would point our clients at a foreign job.
            if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))
        }
        path = [self._bin_dir, str(Path(sys.executable).parent)]
        path += [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p not in path]
        env["PATH"] = os.pathsep.join(path)
        env.update(self.env_overrides)
        return env

    def _write_files(self) -> None:
        assert self.root is not None
        r = self.root
        for d in ("state", f"spool/{self.node}", "log", "run", "bin", "dev"):
            (r / d).mkdir(parents=True)
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        ctld_port, slurmd_port = _free_ports(2)
        self.munge_socket = str(r / "run" / "munge.sock")
        user = (
            os.environ.get("USER")
            or subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
        )
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        conf = f"""\
# Written by klbench tests/slurm_cluster.py: a private single-node test cluster.
ClusterName=klbtest{ctld_port}
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=15
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
MinJobAge=3600
EnforcePartLimits=ALL
KillWait=5
InactiveLimit=0
JobRequeue=1
{"GresTypes=gpu" if self.gpus else ""}
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_mem_mb()}{gres} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        (r / "slurm.conf").write_text(conf)
        if self.gpus:  # fake GPUs (links to /dev/null) so that GPU presets can be scheduled here
            for i in range(self.gpus):
                (r / "dev" / f"nvidia{i}").symlink_to("/dev/null")
            files = f"{r}/dev/nvidia[0-{self.gpus - 1}]" if self.gpus > 1 else f"{r}/dev/nvidia0"
            (r / "gres.conf").write_text(f"AutoDetect=off\nNodeName={self.node} Name=gpu File={files}\n")
        # The sacct stand-in, launched by this interpreter (no dependence on file modes or python3).
        sacct = r / "bin" / "sacct"
        sacct.write_text(
            f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(SACCT_STANDIN))} "$@"\n'
        )
        sacct.chmod(0o755)
        self._bin_dir = str(r / "bin")
        self.env_overrides = {
            "SLURM_CONF": str(r / "slurm.conf"),
            "MUNGE_SOCKET": self.munge_socket,  # for munge/unmunge; slurm reads AuthInfo=socket=
            "KLBENCH_SLURM_PARTITION": self.partition,
        }

    def _start_daemons(self) -> None:
        assert self.root is not None
        r = self.root
        b = self._bins
        cmds = {
            "munged": [
                b["munged"], "--foreground", "--force", f"--socket={self.munge_socket}",
                f"--key-file={r}/munge.key", f"--pid-file={r}/run/munged.pid",
                f"--seed-file={r}/run/munged.seed",  # logs to stderr (munged.out) in the foreground
            ],
            "slurmctld": [b["slurmctld"], "-D", "-i"],
            "slurmd": [b["slurmd"], "-D", "-N", self.node],
        }  # fmt: skip
        env = self.env
        for name, cmd in cmds.items():
            out = open(r / "log" / f"{name}.out", "wb")  # noqa: SIM115 (kept open while it runs)
            self._procs[name] = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in pytest must not hit the daemons first
                preexec_fn=_die_with_parent,
            )  # fmt: skip
            out.close()
            if name == "munged":
                self._wait_for(lambda: os.path.exists(self.munge_socket), "munged socket", 10)

    def _wait_for(self, cond, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self._procs.items():
                if p.poll() is not None:
                    raise _DaemonExited(
                        f"{name} exited with {p.returncode} while waiting for {what}\n{self.logs()}"
                    )
            if cond():
                return
            time.sleep(0.1)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def _node_state(self) -> str:
        p = subprocess.run(
            ["sinfo", "--noheader", "-n", self.node, "-p", self.partition, "-o", "%T"],
            env=self.env, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return p.stdout.strip() if p.returncode == 0 else ""

    def _wait_ready(self) -> None:
        self._wait_for(
            lambda: self._node_state() == "idle", f"node {self.node} idle in sinfo", self.start_timeout
        )

    # ------------------------------------------------------------------- use
    def run(
        self, cmd: str | Sequence[str], check: bool = True, timeout: float = 60, **kw
    ) -> subprocess.CompletedProcess:
        """Run a command against this cluster (shell string or argv list) with `.env`."""
        p = subprocess.run(
            cmd,
            shell=isinstance(cmd, str),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )
        if check and p.returncode != 0:
            raise RuntimeError(
                f"{cmd!r} exited with {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}\n{self.logs()}"
            )
        return p

    def job_states(self, job_id: str) -> dict[str, str]:
        """{job id as squeue shows it ('12', '12_0', '12_[1-3]'): state} for a job or job array."""
        out = self.run(["squeue", "--noheader", "--states=all", "-o", "%F|%A|%i|%T"]).stdout
        states = {}
        for line in out.splitlines():
            array_id, raw_id, shown, state = line.split("|")
            if job_id in (array_id, raw_id, shown):
                states[shown] = state
        return states

    def wait_job(self, job_id: str, timeout: float = 60) -> str:
        """Wait until every task of a job (or array) is final; return the worst state seen."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.job_states(str(job_id))
            if states and all(s in FINAL_STATES for s in states.values()):
                bad = [s for s in states.values() if s != "COMPLETED"]
                return bad[0] if bad else "COMPLETED"
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s: {states}\n{self.logs()}")

    def logs(self, lines: int = 60) -> str:
        """Tail of every daemon log, to append to an assertion message."""
        if self.root is None:
            return "(cluster not started)"
        parts = []
        for name in DAEMONS:
            p = self._procs.get(name)
            status = (
                "not started" if p is None else "running" if p.poll() is None else f"exited {p.returncode}"
            )
            parts.append(f"{name}: {status}")
        log_dir = self.root / "log"
        for f in sorted(log_dir.glob("*")):
            # *.out is the daemon's stderr: a copy of its *.log in foreground mode, so only
            # shown when there is no *.log (a daemon that died before opening it).
            if f.suffix == ".out" and (log_dir / f"{f.stem}.log").exists():
                continue
            text = f.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"----- {f.name} (last {len(text)} lines) -----\n" + "\n".join(text))
        return "\n".join(parts)

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Cancel this cluster's jobs, end the daemons this object started, remove the state dir."""
        if self.root is None:
            return
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            subprocess.run(
                ["scancel", "--user", str(os.getuid())], env=self.env, capture_output=True, timeout=10
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self._active_jobs():
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):  # reverse start order
            p = self._procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self._kill_strays()
        if os.environ.get("KLBENCH_SLURM_KEEP") != "1":
            shutil.rmtree(self.root, ignore_errors=True)
        self.root = None
        self._procs = {}

    def _active_jobs(self) -> bool:
        p = subprocess.run(
            ["squeue", "--noheader", "-o", "%T"], env=self.env, capture_output=True, text=True, timeout=10
        )
        return p.returncode == 0 and bool(p.stdout.strip())

    def _kill_strays(self) -> list[int]:
        """slurmstepd and job processes outlive slurmd; they carry our SLURM_CONF, nobody else's does."""
        marker = f"SLURM_CONF={self.env_overrides.get('SLURM_CONF')}".encode()
        killed = []
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
                continue
            try:
                environ = (pid_dir / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ:
                try:
                    os.kill(int(pid_dir.name), signal.SIGKILL)
                    killed.append(int(pid_dir.name))
                except ProcessLookupError:
                    pass
        return killed


# One cluster per test process, however many modules (or conftest) import the fixture: each
# import is its own fixture definition, so they share the cluster and the last one stops it.
_cluster: SlurmCluster | None = None
_users = 0


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture() -> Iterator[SlurmCluster]:
    """A running private SLURM cluster (see the module docstring); skips if slurm is not installed."""
    global _cluster, _users
    if _cluster is None:
        try:
            _cluster = SlurmCluster().start()
        except SlurmUnavailable as e:
            pytest.skip(str(e))
    cluster = _cluster
    _users += 1
    try:
        yield cluster
    finally:
        _users -= 1
        if _users == 0:
            cluster.stop()
            _cluster = None


def _main() -> None:
    """`python tests/slurm_cluster.py`: start a cluster, print how to use it, stop on Enter."""
    c = SlurmCluster().start()
    print(f"started in {c.startup_s:.2f} s; in another shell:\n  export SLURM_CONF={c.env_overrides['SLURM_CONF']} "
          f"PATH={c.root}/bin:$PATH\n  sinfo; squeue")  # fmt: skip
    try:
        input("Enter stops the cluster ")
    finally:
        c.stop()


if __name__ == "__main__":
    _main()
