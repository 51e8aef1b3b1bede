"""The run-directory guard: one writer per run directory, and what a run may rewrite.

Rules (docs/reliability.md):
* A run holds an exclusive lock on `<run_dir>/.lock` (fcntl, with its pid and host in the file) for its
  whole life; a second run into the same directory fails at once, naming the holder.
* A directory that holds results (metrics, a status, a final policy) is only ever continued from a
  checkpoint (`trainer.resume`), never truncated or restarted; without a checkpoint it is refused.
* A resume is validated before anything in the directory changes: the checkpoint's files, and its
  config against the new one (keys that change the experiment differ only when listed in
  `trainer.resume_allow_changes`; `trainer.steps` may grow).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from klbench.config import RESUMABLE, Config, flatten
from klbench.errors import KlbenchError
from klbench.records import is_train_row, read_jsonl

LOCK = ".lock"


class RunDir:
    """A run directory: what it holds, and its lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = None

    # -- what is there ------------------------------------------------------------------------------
    def status(self) -> dict:
        try:
            return json.loads((self.path / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def logged_steps(self) -> int:
        return sum(is_train_row(r) for r in read_jsonl(self.path / "metrics.jsonl").rows)

    def holds_results(self) -> bool:
        return any((self.path / f).exists() for f in ("metrics.jsonl", "status.json", "summary.json", "final"))

    def describe(self) -> str:
        st = self.status()
        state = f"status {st['status']}" if st.get("status") else "no status"
        return f"{self.path} holds a run ({self.logged_steps()} logged steps, {state})"

    # -- the lock ------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the directory's lock for this process's life, or fail naming its holder."""
        self.path.mkdir(parents=True, exist_ok=True)
        while True:
            fh = open(self.path / LOCK, "a+")  # noqa: SIM115 - held open until release()
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                fh.close()
                raise KlbenchError(f"{self.path} is in use by another klbench run ({holder}); wait for it to end, "
                                   "or choose another hydra.run.dir") from None
            try:  # the holder removes the file as it ends: a lock on the removed file guards nothing
                if os.stat(self.path / LOCK).st_ino == os.fstat(fh.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        self._lock = fh

    def release(self) -> None:
        if self._lock is not None:
            (self.path / LOCK).unlink(missing_ok=True)
            self._lock.close()
            self._lock = None


def check_start(run: RunDir, cfg: Config, checkpoint: Path | None) -> None:
    """Refuse, in one line and before anything is written, a start that would lose or rewrite results."""
    if not run.holds_results():
        return
    if not cfg.trainer.resume:
        raise KlbenchError(f"{run.describe()}: continue it with trainer.resume=auto, or choose another "
                           "hydra.run.dir (nothing was changed)")
    if checkpoint is None:
        raise KlbenchError(f"{run.describe()} but no checkpoint to resume from (it ran with trainer.save_every=0, or "
                           "was killed before its first one): nothing was changed; choose another hydra.run.dir")


def check_resume(cfg: Config, saved: dict, step: int, where: Path) -> None:
    """The new config against the one the checkpoint was made with (`flatten`ed, as meta.json holds it)."""
    if cfg.trainer.steps < step:
        raise KlbenchError(f"trainer.steps={cfg.trainer.steps} but {where} is at step {step}: set trainer.steps >= {step}")
    new = json.loads(json.dumps(flatten(cfg), default=str))
    allowed = set(cfg.trainer.resume_allow_changes)
    changed = [k for k in new if k in saved and new[k] != saved[k]
               and not k.startswith(RESUMABLE) and k not in allowed]
    if changed:
        shown = "; ".join(f"{k}: {saved[k]!r} -> {new[k]!r}" for k in changed[:4]) + ("; ..." if len(changed) > 4 else "")
        raise KlbenchError(f"resuming {where} with a different experiment ({shown}): the steps already run would be "
                           f"misdescribed; use the checkpoint's settings, or allow it with "
                           f"trainer.resume_allow_changes=[{','.join(changed)}]")
