"""The `klbench` command: run | eval | verify | audit | report | bench.

`run` and `eval` are Hydra apps over `conf/` (recipes are its `recipe` group). Before Hydra starts
any job, every job of the invocation (each point of a `-m` sweep, recipe sweeps included) is
composed and validated, so a typo fails in one line before any work is done.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from klbench.config import Config, ConfigError, composer, register_configs, to_config
from klbench.errors import KlbenchError
from klbench.paths import conf_dir, register_resolvers

USAGE = """usage: klbench <command> [args]

commands:
  run      train one experiment, or a sweep with -m (Hydra overrides: kl=k3_as_loss kl.coef=0.5 ...)
  eval     evaluate a model on benchmarks (model.name_or_path=... data=math500 eval.samples=4)
  verify   check the paper's KL-gradient claims exactly on klbench's loss code
  audit    which KL term each RL framework's shipped code optimises (verl, OpenRLHF, TRL, ...)
  report   turn a sweep directory into tables, plots and a manifest
  bench    benchmark klbench against TRL GRPOTrainer on identical work

`klbench <command> --help` shows each command's options (run/eval: Hydra's help, config groups).
"""

#: Sweeps larger than this are not pre-validated point by point (the base config still is).
MAX_PREVALIDATE = 512

# at import: launcher workers (joblib, submitit) unpickle the task from this module and resolve
# the job's directory (`${klbench_job:...}`) in their own process
register_resolvers()


# -- one-line errors --------------------------------------------------------------------------
def _section_keys(full_key: str) -> str:
    """The keys allowed next to `full_key` (e.g. 'kl.coeff' → the fields of KLConfig)."""
    import dataclasses

    node = Config()
    parts = full_key.split(".")[:-1]
    for p in parts:
        node = getattr(node, p, None)
        if not dataclasses.is_dataclass(node):
            return ""
    names = [f.name for f in dataclasses.fields(node)]
    where = ".".join(parts) or "the top level"
    return f"; keys allowed at {where}: {', '.join(names)}"


def one_line(exc: BaseException) -> str:
    """A user-facing one-line message for a config/composition error."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    chain, e = [], exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            msg = str(e).strip().splitlines()[0]
            if isinstance(e, (ConfigKeyError, ConfigAttributeError)):
                return f"unknown config key '{e.full_key}'{_section_keys(e.full_key)}"
            choices = re.fullmatch(r"Invalid value '.*', expected one of \[(.*)\]", msg)
            if choices:  # a value outside a Choice enum of klbench.config
                return f"{e.full_key}={e.value!r} is not valid; allowed: {choices.group(1)}"
            return f"{e.full_key}: {msg}"
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Available options" in text:
        head = lines[0]
        i = next(i for i, ln in enumerate(lines) if ln.startswith("Available options"))
        return f"{head}; {lines[i].rstrip(':').lower()}: {', '.join(lines[i + 1:])}"
    return "; ".join(lines[:2]) if lines else type(exc).__name__


def fail(msg: str, code: int = 2) -> None:
    print(f"klbench: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


# -- pre-validation ---------------------------------------------------------------------------
HYDRA_FLAGS_WITH_ARG = {"--cfg", "-c", "--package", "-p", "--info", "--config-path", "-cp", "--config-name",
                        "-cn", "--config-dir", "-cd", "--experimental-rerun"}


def split_argv(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """(overrides, hydra flags, multirun?) of a `klbench run` command line."""
    overrides, flags, multirun, i = [], [], False, 0
    while i < len(argv):
        a = argv[i]
        if a in ("-m", "--multirun"):
            multirun = True
            flags.append(a)
        elif a.startswith("-"):
            flags.append(a)
            if a in HYDRA_FLAGS_WITH_ARG and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                i += 1
                flags.append(argv[i])
        else:
            overrides.append(a)
        i += 1
    return overrides, flags, multirun


def _flag_value(flags: list[str], *names: str) -> str | None:
    """The value of `--config-dir DIR` / `-cd DIR` / `--config-dir=DIR` among Hydra's flags."""
    for i, f in enumerate(flags):
        if f in names and i + 1 < len(flags):
            return flags[i + 1]
        for n in names:
            if f.startswith(n + "="):
                return f.split("=", 1)[1]
    return None


def _first_sweep(overrides: list[str]) -> str | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for ov in OverridesParser.create().parse_overrides(overrides):
        if ov.is_sweep_override() and not ov.get_key_element().lstrip("+~").startswith("hydra"):
            return ov.input_line
    return None


def prevalidate(overrides: list[str], multirun: bool, config_name: str = "config",
                config_dir: str | None = None) -> bool:
    """Compose and validate every job of the invocation; exit with one line on the first error.

    Returns whether the invocation is a multirun (`-m`, or `hydra.mode: MULTIRUN` set by a recipe).
    """
    from omegaconf import OmegaConf

    from klbench.train.sweep import expand_jobs

    if config_dir is not None and not Path(config_dir).is_dir():
        fail(f"--config-dir {config_dir}: no such directory")
    try:
        with composer(config_dir, config_name) as compose:
            first = compose(expand_jobs(None, overrides)[0], hydra=True)
            multirun = multirun or str(first.hydra.mode) in ("MULTIRUN", "RunMode.MULTIRUN")
            sweep = _first_sweep(overrides)
            if sweep and not multirun:
                fail(f"'{sweep}' is a sweep: add -m (klbench run -m {sweep})")
            params = first.hydra.sweeper.get("params") if multirun else None
            task = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
            jobs = expand_jobs(OmegaConf.to_container(params) if params else None, task)
            for job in jobs[:MAX_PREVALIDATE]:
                to_config(compose(job))
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - every composition error becomes one line
        fail(one_line(e))
    return multirun


def launcher_overrides(overrides: list[str]) -> list[str]:
    """Under torchrun / deepspeed (WORLD_SIZE > 1) every rank takes rank 0's run directory.

    Hydra resolves `${now:...}` in each process, and two processes can straddle a second. This joins
    the process group early (run_experiment reuses it) and broadcasts rank 0's resolved
    hydra.run.dir.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return []
    import torch.distributed as dist

    from klbench.train import runstate

    runstate.from_env()
    run_dir = [None]
    if dist.get_rank() == 0:
        with composer() as compose:
            run_dir[0] = compose(overrides, hydra=True).hydra.run.dir
    dist.broadcast_object_list(run_dir, src=0)
    return [f"hydra.run.dir={run_dir[0]}"]


# -- hydra tasks --------------------------------------------------------------------------------
def _job_context():
    """(run_dir, sweep name or None, tags, multirun?) of the current Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    sweep = f"{Path(hc.sweep.dir).parent.name}_{Path(hc.sweep.dir).name}" if multirun else None
    tags = [o for o in hc.overrides.task if not o.startswith(("hydra", "logger", "trainer.threads"))]
    return run_dir, sweep, tags, multirun


def unexpected(e: BaseException) -> str:
    """The one line an unexpected exception becomes (KLBENCH_DEBUG=1 shows the traceback instead)."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return (f"{type(e).__name__}: {first} (an unexpected error: please report it; KLBENCH_DEBUG=1 prints "
            "the traceback)")


def _job(what: str, work, dcfg):
    """Run one Hydra job; a failure is one line (in a sweep: listed, and the sweep goes on)."""
    run_dir, sweep, tags, multirun = _job_context()
    try:
        return work(to_config(dcfg), run_dir, sweep, tags, lambda d: write_hydra_record(d, dcfg))
    except (KlbenchError, ConfigError) as e:
        if multirun:  # one failed job must not stop the sweep; it is listed at the end and by `report`
            print(f"klbench: {what} {run_dir.name} failed: {e}", file=sys.stderr)
            return None
        fail(str(e), code=1)
    except Exception as e:
        if os.environ.get("KLBENCH_DEBUG"):
            raise
        if multirun:
            import traceback

            (run_dir / "error.log").write_text(traceback.format_exc())
            print(f"klbench: {what} {run_dir.name} failed: {unexpected(e)} (see {run_dir / 'error.log'})",
                  file=sys.stderr)
            return None
        fail(unexpected(e), code=1)


def write_hydra_record(run_dir: Path, dcfg) -> None:
    """`.hydra/` (config, hydra, overrides), as Hydra writes it, once the job owns its directory: Hydra's own
    write (hydra.output_subdir) is off so that a refused job leaves an existing run directory as it was."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(dcfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hc, resolve=False)}), out / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(hc.overrides.task)), out / "overrides.yaml")


def _train(cfg, run_dir, sweep, tags, record):
    from klbench.evaluate import training_evaluator
    from klbench.train.run import run_experiment

    return run_experiment(cfg, run_dir, sweep=sweep, tags=tags, make_evaluator=training_evaluator(cfg, run_dir),
                          on_start=record)


def _evaluate(cfg, run_dir, sweep, tags, record):
    from klbench.evaluate import evaluate_model

    record(run_dir)
    return evaluate_model(cfg, run_dir)


def run_task(dcfg) -> dict | None:
    """Hydra's task for `klbench run`: one experiment in the job's output directory."""
    return _job("job", _train, dcfg)


def eval_task(dcfg) -> dict | None:
    """Hydra's task for `klbench eval`: evaluate one model in the job's output directory."""
    return _job("eval job", _evaluate, dcfg)


def hydra_app(task, argv: list[str], prog: str, config_name: str = "config") -> None:
    import hydra

    from klbench.train.sweep import FAILED

    register_configs()
    overrides, flags, multirun = split_argv(argv)
    if not any(f in ("--help", "-h", "--hydra-help", "--info", "-i", "--version") for f in flags):
        config_dir = _flag_value(flags, "--config-dir", "-cd")
        multirun = prevalidate(overrides, multirun, config_name, config_dir)
        if not multirun:
            argv = [*argv, *launcher_overrides(overrides)]
    sys.argv = [prog, *argv]
    hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")(task)()
    if multirun and FAILED:
        fail(f"{len(FAILED)} sweep job(s) did not complete (listed above)", code=1)


# -- entry point --------------------------------------------------------------------------------
def _command(cmd: str, rest: list[str]) -> int | None:
    if cmd == "run":
        return hydra_app(run_task, rest, "klbench run")
    if cmd == "eval":
        return hydra_app(eval_task, rest, "klbench eval")
    if cmd == "verify":
        from klbench.theory import main as verify_main

        return verify_main(rest)
    if cmd == "audit":
        from klbench.audit import main as audit_main

        return audit_main(rest)
    if cmd == "report":
        from klbench.report import main as report_main

        return report_main(rest)
    if cmd == "bench":
        from klbench.bench.runner import main as bench_main

        return bench_main(rest)
    print(USAGE, file=sys.stderr)
    fail(f"unknown command {cmd!r}; commands: run, eval, verify, audit, report, bench")


#: Busy-wait iterations of an idle OpenMP thread before it sleeps (libgomp's default: 300000).
OPENMP_SPIN_COUNT = 2000


def main(argv: list[str] | None = None) -> None:
    """The error boundary of every command: a known failure is one line; anything else is one line too
    unless KLBENCH_DEBUG=1 asks for the traceback. Exit status 2: usage, 1: the work failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # before torch loads: OpenMP threads that spin while they wait collapse as soon as anything else runs on
    # the cores, and threads that sleep at once wake too slowly for small models; a short spin does both
    # (docs/performance.md, "Sharing the machine"). The user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", str(OPENMP_SPIN_COUNT))
    logging.basicConfig(level=os.environ.get("KLBENCH_LOGLEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    try:
        code = _command(argv[0], argv[1:])
    except (KlbenchError, ConfigError) as e:
        fail(str(e), code=1)
    except KeyboardInterrupt:
        print("klbench: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        if os.environ.get("KLBENCH_DEBUG"):
            raise
        fail(unexpected(e), code=1)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
