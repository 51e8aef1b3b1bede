"""Where a result came from: the klbench commit and the machine, described without host names or paths.

Light on purpose (standard library only): `klbench run` records it in every run's status.json,
`klbench report` and `klbench bench` in their manifests.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path


def _git(root: Path, *args: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def git_info() -> dict:
    """The klbench source tree's commit and whether its source (klbench/, conf/) differs from it."""
    from importlib import metadata

    root = Path(__file__).resolve().parent.parent
    try:
        version = metadata.version("klbench")
    except metadata.PackageNotFoundError:
        version = None
    if _git(root, "rev-parse", "--is-inside-work-tree") != "true":
        return {"commit": None, "dirty": None, "version": version,
            "note": "klbench is not running from a git checkout"}
    commit = _git(root, "rev-parse", "HEAD")
    paths = [p for p in ("klbench", "conf", "pyproject.toml") if (root / p).exists()]
    changes = _git(root, "status", "--porcelain", "--", *paths)
    info = {"commit": commit, "dirty": bool(changes) if changes is not None else None, "version": version}
    if commit is None:
        info["note"] = "the repository has no commit yet"
    return info


def machine_info() -> dict:
    """This machine, without host names or paths: CPU, cores, RAM, GPUs, OS, python/torch versions."""
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = None
    gpus = []
    if shutil.which("nvidia-smi"):
        try:
            p = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=15)
            gpus = [g.strip() for g in p.stdout.splitlines() if g.strip()] if p.returncode == 0 else []
        except (OSError, subprocess.TimeoutExpired):
            pass
    os_name = f"{platform.system()} {platform.release()}"
    try:
        pretty = re.search(r'^PRETTY_NAME="?([^"\n]*)', Path("/etc/os-release").read_text(), re.M)
        if pretty:
            os_name = f"{pretty.group(1)} ({os_name})"
    except OSError:
        pass
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(ram, 1) if ram else None, "gpus": gpus,
        "os": os_name, "python": platform.python_version(), "torch": torch}
