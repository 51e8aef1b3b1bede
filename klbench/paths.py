"""Where klbench's files live: its config tree, its cache, benchmark data, sweep job directories.

Standard library only at import time: every layer may use it. `register_resolvers()` installs the
OmegaConf resolvers the config tree uses (`${klbench_data:gsm8k}`, `${klbench_job:...}`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

#: Longest job-directory name a sweep makes from its overrides (file systems allow 255 bytes).
MAX_JOB_DIRNAME = 120

_PACKAGE = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """The Hydra config tree: `conf/` of a source checkout, else the copy a wheel carries."""
    src = _PACKAGE.parent / "conf"
    return src if (src / "config.yaml").exists() else _PACKAGE / "_conf"


def cache_root() -> Path:
    """$KLBENCH_CACHE, else $XDG_CACHE_HOME/klbench, else ~/.cache/klbench (the built miniature, data)."""
    if os.environ.get("KLBENCH_CACHE"):
        return Path(os.environ["KLBENCH_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "klbench"


def data_root() -> Path:
    """Where the benchmark presets look for `<name>/<split>.jsonl`: $KLBENCH_DATA, else the cache's data/."""
    return Path(os.environ["KLBENCH_DATA"]) if os.environ.get("KLBENCH_DATA") else cache_root() / "data"


def data_dir(name: str) -> str:
    """`${klbench_data:gsm8k}`: one benchmark's folder under `data_root()`."""
    return str(data_root() / name)


def job_dirname(overrides: str) -> str:
    """A sweep job's directory name from its overrides: no '/', bounded length (`${klbench_job:...}`)."""
    name = overrides.replace("/", "|")
    if len(name) > MAX_JOB_DIRNAME:
        name = name[: MAX_JOB_DIRNAME - 9] + "~" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def register_resolvers() -> None:
    """Install the resolvers of the config tree (idempotent; launcher workers call it too)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("klbench_job", job_dirname, replace=True)
    OmegaConf.register_new_resolver("klbench_data", data_dir, replace=True)
