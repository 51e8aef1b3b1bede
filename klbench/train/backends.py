"""Policy-update backends: plain torch (optionally DDP) and DeepSpeed, behind one small interface.

A backend owns the optimizer and LR schedule. `model` is what training forwards must go through
(the DDP / DeepSpeed wrapper), `step(loss)` does backward + clip + optimizer step and returns the
pre-clip gradient norm (torch: a 0-dim tensor, read with the step's other metrics; after
`accumulate(loss)` of a mini-batch's earlier micro-batches),
`end_of_step()` advances the schedule once per RL step. `full_weights()`
is the context in which the raw policy module may be read outside a training forward (sampling,
weight syncs, evaluation, saving), and `prepare_reference(ref)` the frozen π_ref as forwards use
it: both only matter under DeepSpeed ZeRO-3, which shards parameters across ranks.
"""

from __future__ import annotations

import contextlib

import torch

from klbench.config import TrainerConfig
from klbench.train.ds_backend import DeepSpeedBackend
from klbench.train.runstate import Dist
from klbench.train.schedule import lr_lambda


class TorchBackend:
    def __init__(self, cfg: TrainerConfig, model: torch.nn.Module, dist: Dist):
        self.cfg, self.module = cfg, model
        self.model = model
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            dev = next(model.parameters()).device
            self.model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        params = [p for p in model.parameters() if p.requires_grad]
        # The fused kernel (CPU and CUDA) is several times faster than the per-tensor loop; it needs
        # floating-point parameters on one device type.
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.weight_decay, fused=all(p.is_floating_point() for p in params))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def accumulate(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's share of the mini-batch loss; `step` takes the last one."""
        loss.backward()

    def step(self, loss: torch.Tensor) -> torch.Tensor:
        loss.backward()
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return norm.detach()  # a tensor: the loop reads all metrics in one transfer per step

    def end_of_step(self) -> None:
        self.sched.step()

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])

    def full_weights(self):
        """Context in which the policy holds its full weights (DeepSpeed ZeRO-3 gathers them)."""
        return contextlib.nullcontext(self.module)

    def prepare_reference(self, ref: torch.nn.Module) -> torch.nn.Module:
        """The frozen reference policy as forwards should use it (DeepSpeed ZeRO-3 shards it)."""
        return ref


def build_backend(cfg: TrainerConfig, model: torch.nn.Module, dist: Dist, micro_batch_size: int = 1):
    """`micro_batch_size`: the samples one rank holds in a mini-batch (DeepSpeed's bookkeeping)."""
    if cfg.backend == "torch":
        return TorchBackend(cfg, model, dist)
    if cfg.backend == "deepspeed":
        return DeepSpeedBackend(cfg, model, dist, micro_batch_size=micro_batch_size)
    raise ValueError(f"unknown trainer.backend {cfg.backend!r}; expected torch or deepspeed")
