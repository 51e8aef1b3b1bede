"""Shared fixtures: one miniature model per test session, CLI runner, paths.

The miniature (tokenizer + SFT-warm-started tiny Qwen2) takes about a minute to build on 2 cores;
every test that trains or evaluates reuses one build through `KLBENCH_CACHE`. Set KLBENCH_CACHE
yourself to reuse a cache across sessions (CI points it at a directory inside the clone).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config):
    # The benchmark rows the tests read: ../shared/data beside the repository (a user's default is
    # their own cache). .ci/run sets the same; a KLBENCH_DATA already set wins.
    if SHARED_DATA.is_dir():
        os.environ.setdefault("KLBENCH_DATA", str(SHARED_DATA))
    # No hub here: a missing dataset or model must fail at once, not after minutes of retries.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # Test subprocesses must not upload anything, and must not wait on a W&B service.
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")


@pytest.fixture(scope="session")
def miniature_cache(tmp_path_factory) -> Path:
    """KLBENCH_CACHE holding a built miniature (built once per session if absent)."""
    cache = Path(os.environ.get("KLBENCH_CACHE") or tmp_path_factory.mktemp("klbench-cache"))
    os.environ["KLBENCH_CACHE"] = str(cache)
    from klbench.config import ModelConfig
    from klbench.models import miniature_dir

    miniature_dir(ModelConfig())
    return cache


@pytest.fixture(scope="session")
def miniature_dir(miniature_cache) -> Path:
    from klbench.config import ModelConfig
    from klbench.models import miniature_dir as build

    return build(ModelConfig())


def klbench(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run the `klbench` CLI in a subprocess (the same interpreter), capturing its output."""
    proc = subprocess.run([sys.executable, "-m", "klbench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"klbench {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def run_cli():
    return klbench


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA} (the ../shared/data folder beside the repo)")
    return SHARED_DATA
