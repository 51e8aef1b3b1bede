"""The error type for mistakes a user can fix, and the argument parser whose mistakes are one line too."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn


class KlbenchError(RuntimeError):
    """A user-fixable problem (bad path, unloadable model, bad data row); the message says what to do."""


def warn(msg: str) -> None:
    """A warning the user must see, whatever the logging setup: one `klbench: warning:` line on stderr."""
    print(f"klbench: warning: {msg}", file=sys.stderr, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage mistake as one line `klbench: error: ...` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"klbench: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def writable_dir(path: Path, flag: str = "--out") -> Path:
    """Create `path` if needed and check a file can be written there, before any work is done."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".klbench-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise KlbenchError(f"{flag} {path}: cannot write there ({e.strerror or e}); choose another directory") from e
    return path
