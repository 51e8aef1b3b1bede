"""DeepSpeed policy updates (ZeRO stage 0-3, optional CPU offload) behind the backend interface.

`DeepSpeedBackend` is a drop-in for `TorchBackend`: `model` is the DeepSpeed engine forwards go
through, `step(loss)` is `engine.backward` + `engine.step` and returns the pre-clip gradient norm,
`end_of_step()` advances klbench's LR schedule. The batch sizes, the optimizer, precision and the
single-process set-up are chosen as docs/scaling.md ("The DeepSpeed backend") explains.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from klbench.config import TrainerConfig
from klbench.errors import KlbenchError
from klbench.train.runstate import Dist
from klbench.train.schedule import lr_lambda

#: Tag of the one checkpoint `save(dir)` writes (DeepSpeed keeps it under `dir/TAG/`).
TAG = "state"


def ds_config(
    cfg: TrainerConfig, *, dtype: torch.dtype, device: torch.device, world: int, micro_batch_size: int = 1
) -> dict:
    """The DeepSpeed config dict for `cfg` (see the module docstring for the batch sizes)."""
    ds = cfg.deepspeed
    if dtype == torch.float16:
        raise KlbenchError(
            "trainer.backend=deepspeed does not train float16 models (loss-scale overflow steps "
            "are skipped, which the loop reports as non-finite); set model.dtype=bfloat16 or float32"
        )
    zero: dict = {"stage": ds.zero_stage}
    pin = device.type == "cuda"
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        # the client AdamW (not DeepSpeed's fused one) is what the torch backend uses
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return merge(config, ds.extra)


def merge(base: dict, extra: dict) -> dict:
    """`base` with `extra` merged in recursively (extra wins)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def accelerator(device: torch.device):
    """DeepSpeed's accelerator, checked against the policy's device (DeepSpeed moves the model to
    its accelerator). A CPU policy selects DeepSpeed's CPU accelerator when DeepSpeed is not yet
    imported; a GPU machine otherwise makes DeepSpeed pick CUDA."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != device.type:
        raise KlbenchError(
            f"the policy is on {device.type} but DeepSpeed's accelerator is {acc.device_name()}; "
            f"set DS_ACCELERATOR={device.type} in the environment, or trainer.device={acc.device_name()}"
        )
    return acc


def join_single_process_group(backend: str) -> None:
    """What a launcher would provide, for a single process started without one: the env vars
    DeepSpeed reads, and a one-process group over an in-memory store (no port to collide on)."""
    import torch.distributed as tdist

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    if int(os.environ["WORLD_SIZE"]) != 1:
        raise KlbenchError("WORLD_SIZE > 1 but no process group: launch with torchrun or deepspeed")
    if not tdist.is_initialized():
        tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1)


def build_optimizer(
    cfg: TrainerConfig, model: torch.nn.Module, device: torch.device
) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"lr": cfg.lr, "betas": (cfg.adam_beta1, cfg.adam_beta2), "weight_decay": cfg.weight_decay}
    if cfg.deepspeed.offload_optimizer and device.type == "cuda":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


class DeepSpeedBackend:
    """ZeRO-sharded AdamW updates; see the module docstring for the DeepSpeed settings."""

    def __init__(self, cfg: TrainerConfig, model: torch.nn.Module, dist: Dist, micro_batch_size: int = 1):
        first = next(model.parameters())
        self.device = first.device
        acc = accelerator(self.device)
        import deepspeed

        if dist.world == 1:
            join_single_process_group(acc.communication_backend_name())
        self.cfg, self.module, self.dist = cfg, model, dist
        self.config = ds_config(cfg, dtype=first.dtype, device=self.device, world=dist.world,
            micro_batch_size=micro_batch_size)
        self.opt = build_optimizer(cfg, model, self.device)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.opt, config=self.config)
        self.model = self.engine
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def step(self, loss: torch.Tensor) -> float:
        """Backward (gradients averaged over ranks), clip to `trainer.grad_clip`, AdamW step.

        Returns the pre-clip global gradient norm: the ZeRO / bf16 optimizers report it; plain
        fp32 stage 0 does not, so it is computed here from the already-averaged gradients.
        """
        self.engine.backward(loss)
        norm = None
        if not self.engine.zero_optimization() and not self.engine.bfloat16_enabled():
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            norm = float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            )
        self.engine.step()
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        if norm is None:
            raise KlbenchError(
                "DeepSpeed reported no gradient norm (zero_optimization.compute_grad_norm is off?)"
            )
        return float(norm)

    def end_of_step(self) -> None:
        self.sched.step()

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The LR schedule only: weights and (sharded) optimizer state are written by `save(dir)`."""
        return {"backend": "deepspeed", "scheduler": self.sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("backend") != "deepspeed":
            raise KlbenchError(
                "this checkpoint was written by trainer.backend=torch; resume it with that backend"
            )
        self.sched.load_state_dict(state["scheduler"])

    def save(self, directory: str | Path) -> Path:
        """Write everything the backend holds into `directory`/deepspeed and return that path:
        module weights, this rank's ZeRO optimizer shard, and the LR schedule.

        Collective: every rank calls it with the same path (each rank writes its own shard).
        """
        path = Path(directory) / "deepspeed"
        self.engine.save_checkpoint(str(path), tag=TAG, client_state={"klbench": self.state_dict()},
            save_latest=False)
        return path

    def load(self, directory: str | Path) -> None:
        """Restore what `save(directory)` wrote (same world size and ZeRO stage). Collective."""
        path = Path(directory) / "deepspeed"
        if not (path / TAG).is_dir():
            raise KlbenchError(
                f"no DeepSpeed checkpoint at {path / TAG}; was this checkpoint written with "
                "trainer.backend=deepspeed?"
            )
        loaded, client = self.engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True,
            load_lr_scheduler_states=False)
        if loaded is None:
            raise KlbenchError(f"DeepSpeed could not load the checkpoint at {path / TAG}")
        self.load_state_dict(client["klbench"])

    @contextlib.contextmanager
    def full_weights(self):
        """A context in which the policy module holds its full weights, for everything that reads
        them outside a training forward: sampling, weight syncs to a rollout engine, evaluation,
        `save_pretrained`. Collective under ZeRO-3 (every rank enters it; each gathers the whole
        model once and DeepSpeed's per-layer fetch hooks are off, so ranks may run different
        numbers of forwards inside it). Below stage 3 the weights are always whole.
        """
        if not self.engine.zero_optimization_partition_weights():
            yield self.module
            return
        from deepspeed.runtime.zero import unwrap_model_for_generation

        with unwrap_model_for_generation(self.engine):
            yield self.module

    def prepare_reference(self, ref: torch.nn.Module) -> torch.nn.Module:
        """The frozen reference policy: sharded with ZeRO-3 (no optimizer) when the policy is.

        Under ZeRO-3 every rank holds 1/world of π_ref's weights and gathers each layer for its
        forward, as it does for the policy. Calls go to the returned module directly (ZeRO-3 hooks
        sit on its submodules). Below stage 3 π_ref stays an ordinary replicated module.
        """
        if self.cfg.deepspeed.zero_stage != 3:
            return ref
        import deepspeed

        config = {k: v for k, v in self.config.items() if k not in ("gradient_clipping",)}
        config["zero_optimization"] = {
            k: v for k, v in config["zero_optimization"].items() if k != "offload_optimizer"
        }
        engine, _, _, _ = deepspeed.initialize(model=ref, config=config)
        engine.eval()
        self.ref_engine = engine
        return engine.module
