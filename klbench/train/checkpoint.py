"""Checkpoints that survive a kill at any instant, and exact resume.

A checkpoint is a directory `checkpoints/step_NNNNNN/` holding
  policy/             the policy in Hugging Face format (safetensors; LoRA: its adapters only)
  trainer_state.pt    step, optimizer, LR schedule, KL controller, lagged-policy snapshots
  rng_rank<R>.pt      RNG states of every rank
  meta.json           written last: step, the model fingerprint, the run's config, file sizes
It is written into a temporary sibling and renamed into place, so a kill during a save leaves
the previous checkpoint as the latest; `meta.json` lists every file with its size, so a
truncated file is caught at load time with a message naming it. The data stream and the
sampler are pure functions of the step, so the step number is the sampler position.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import torch

from klbench.config import flatten
from klbench.errors import KlbenchError
from klbench.models import is_lora
from klbench.train.logprobs import token_logprobs
from klbench.train.runstate import rng_state

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def model_fingerprint(model: torch.nn.Module) -> dict:
    """What must match between a checkpoint and the model it is loaded into."""
    cfg = getattr(model, "config", None)
    arch = {}
    if cfg is not None:
        for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "tie_word_embeddings"):
            if hasattr(cfg, k):
                arch[k] = getattr(cfg, k)
    arch["parameters"] = sum(p.numel() for p in model.parameters())
    return arch


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (those with meta.json), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "meta.json").exists()
    ]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def check_healthy(trainer) -> None:
    """Refuse to save a policy an update has broken: a parameter whose norm is not finite (a nan or inf, or
    entries so large their squares overflow, ~1e19 in float32), or non-finite log-probs on a sample of the
    last batch. Names the last good checkpoint."""
    with trainer.backend.full_weights():  # collective under DeepSpeed ZeRO-3
        bad = next((f"parameter {n}" for n, p in trainer.policy.named_parameters()
                    if not torch.isfinite(torch.linalg.vector_norm(p, dtype=torch.float32))), None)
    if bad is None and trainer.last_batch is not None:
        with torch.no_grad():
            logp, _ = token_logprobs(trainer.backend.model, trainer.last_batch.select(torch.arange(1)))
        bad = None if torch.isfinite(logp).all() else "its log-probs on the last batch"
    if bad is not None:
        good = list_checkpoints(trainer.run_dir)
        raise KlbenchError(
            f"step {trainer.step}: the update left the policy non-finite ({bad}), so it was not saved; "
            f"last good checkpoint: {good[-1] if good else 'none'}; lower trainer.lr or keep trainer.grad_clip on"
        )


def save(trainer, run_dir: Path, keep_last: int) -> Path:
    """Write the trainer's checkpoint for its current step (rank 0 writes the shared files).

    Written into a temporary sibling and renamed into place: a failure (a full disk) removes the
    temporary, leaves every earlier checkpoint as it was, and raises one line saying so.
    """
    check_healthy(trainer)
    dist = trainer.dist
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{trainer.step:06d}"
    tmp = root / f".tmp-step_{trainer.step:06d}"
    old = root / f".old-step_{trainer.step:06d}"
    try:
        if dist.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        torch.save(rng_state(), tmp / f"rng_rank{dist.rank}.pt")
        backend_dir = trainer.backend.save(tmp) if hasattr(trainer.backend, "save") else None
        dist.barrier()
        with trainer.backend.full_weights():  # collective under DeepSpeed ZeRO-3
            if dist.is_main:
                trainer.policy.save_pretrained(tmp / "policy", safe_serialization=True)
                fingerprint = model_fingerprint(trainer.policy)
        if dist.is_main:
            state = trainer.state_dict()
            state.pop("rng", None)
            if backend_dir is not None:
                state.pop("backend", None)
            torch.save(state, tmp / "trainer_state.pt")
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            meta = {"step": trainer.step, "world_size": dist.world, "model": fingerprint,
                    "backend": trainer.cfg.trainer.backend, "config": flatten(trainer.cfg), "files": files}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
            for p in tmp.rglob("*"):
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            if final.exists():  # re-saving the same step (e.g. preempted right after a periodic save)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            _fsync_dir(root)
            for stale in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(stale, ignore_errors=True)
    except Exception as e:  # noqa: BLE001 - a full disk reaches torch.save as RuntimeError, safetensors as its own
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():  # the re-saved step's earlier copy goes back in place
            os.replace(old, final)
        good = list_checkpoints(run_dir)
        why = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise KlbenchError(
            f"step {trainer.step}: the checkpoint could not be written ({why}); "
            f"{f'earlier checkpoints are intact, the latest {good[-1]}' if good else 'no earlier checkpoint exists'}"
        ) from e
    dist.barrier()
    return final


def resolve(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint `trainer.resume` names: None, 'auto' (latest in run_dir, if any) or a path."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if path.is_dir() and (path / "checkpoints").is_dir():  # a run directory: take its latest
        found = list_checkpoints(path)
        if not found:
            raise KlbenchError(
                f"trainer.resume={resume}: no complete checkpoint under {path / 'checkpoints'}"
            )
        return found[-1]
    if not (path / "meta.json").exists():
        raise KlbenchError(
            f"trainer.resume={resume}: not a checkpoint (no meta.json in {path}); "
            "use trainer.resume=auto or a checkpoints/step_NNNNNN directory"
        )
    return path


def verify(path: Path) -> dict:
    """Read meta.json and check every listed file is present with its recorded size."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KlbenchError(f"corrupt checkpoint: cannot read {path / 'meta.json'} ({e})") from e
    for rel, size in meta.get("files", {}).items():
        f = path / rel
        if not f.exists():
            raise KlbenchError(f"corrupt checkpoint: {f} is missing")
        if f.stat().st_size != size:
            raise KlbenchError(
                f"corrupt checkpoint: {f} has {f.stat().st_size} bytes, {size} were written "
                "(truncated?); delete this checkpoint to resume from an earlier one"
            )
    return meta


def load(trainer, path: Path) -> None:
    """Restore the trainer from checkpoint `path` (after checking it fits the model)."""
    meta = verify(path)
    with trainer.backend.full_weights():  # collective under DeepSpeed ZeRO-3
        want = model_fingerprint(trainer.policy)
    if meta.get("model") != want:
        diff = {
            k: (meta.get("model", {}).get(k), want.get(k))
            for k in want
            if meta.get("model", {}).get(k) != want[k]
        }
        detail = ", ".join(
            f"{k}: checkpoint {a} vs model {b}" for k, a, b in ((k, *v) for k, v in diff.items())
        )
        raise KlbenchError(f"checkpoint {path} was made for a different model ({detail})")
    if meta.get("world_size", 1) != trainer.dist.world:
        raise KlbenchError(
            f"checkpoint {path} was written by {meta.get('world_size')} processes, "
            f"this run has {trainer.dist.world}; resume with the same number of processes"
        )
    from safetensors.torch import load_file

    lora = is_lora(trainer.policy)  # a LoRA checkpoint holds the adapters only
    try:
        weights = load_file(str(path / "policy" / ("adapter_model.safetensors" if lora else "model.safetensors")))
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        rng = torch.load(path / f"rng_rank{trainer.dist.rank}.pt", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a corrupt checkpoint
        raise KlbenchError(f"corrupt checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    if hasattr(trainer.backend, "load") and "backend" not in state:
        trainer.backend.load(path)  # DeepSpeed: module weights, optimizer shards, LR schedule
    elif lora:
        from peft import set_peft_model_state_dict

        unexpected = set_peft_model_state_dict(trainer.policy, weights).unexpected_keys
        if unexpected:
            raise KlbenchError(f"checkpoint {path}: adapters that do not fit the model: {unexpected[:3]}")
    else:
        missing, unexpected = trainer.policy.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embedding
        if missing or unexpected:
            raise KlbenchError(
                f"checkpoint {path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
    state["rng"] = rng
    trainer.load_state_dict(state)


class Preemption:
    """Turns SIGTERM / SIGUSR1 / SIGUSR2 into "checkpoint at the end of this step, then leave".

    Handlers installed before ours (submitit's USR2 requeue handler on SLURM) are chained: after the
    checkpoint is written, the earlier handler runs (and requeues the job); with none, the run exits.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> Preemption:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. some launchers): leave signals alone
                return self
        return self

    def _on_signal(self, signum, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def hand_over(self) -> None:
        """Run the handler that was there before ours for the received signal (e.g. submitit's requeue)."""
        prev = self._previous.get(self.received)
        self.restore()
        if callable(prev) and prev not in (signal.default_int_handler,):
            prev(self.received, None)


class Preempted(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised after a signal-triggered checkpoint, so the run records status 'preempted' and exits."""

    def __init__(self, signum: int, checkpoint: Path, signals: Preemption):
        super().__init__(f"received {signal.Signals(signum).name}; checkpoint saved at {checkpoint}")
        self.signum, self.checkpoint, self.signals = signum, checkpoint, signals
