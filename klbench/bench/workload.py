"""The benchmarked RL step, shared by every side: its settings, the workloads, worker specs and helpers."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from klbench.config import ModelConfig, composer, to_config
from klbench.models import build_byte_tokenizer, build_miniature, resolve_model_dir

# The RL step of the miniature workloads; a workload may change the batch, the data and the model (`Workload`).
PROMPTS_PER_STEP = 16


GROUP_SIZE = 8


MAX_NEW_TOKENS = 14


TEMPERATURE = 1.0


BETA = 0.2  # KL coefficient


CLIP_EPS = 0.2


LR = 1e-4


ADAM_BETAS = (0.9, 0.99)


GRAD_CLIP = 1.0


STD_EPS = 1e-4  # TRL's advantage epsilon (klbench's default is 1e-6)


TRAIT_BONUS = 0.5


@dataclass(frozen=True)
class Workload:
    """A model and the RL step both sides run on it. The miniature workloads share the step above; the
    real model's (`smollm2`) is smaller per step, on chat-form addition, with LoRA and klbench's vLLM engine."""

    name: str
    hidden_size: int | None = None  # a scratch (random-init) model of this shape; None: model_group's model
    num_layers: int = 0
    num_heads: int = 0
    intermediate_size: int = 0
    model_group: str = "miniature"  # conf/model/<group>.yaml: the model, its LoRA settings and dtype
    data: str = "arithmetic"  # conf/data/<data>.yaml
    prompts_per_step: int = PROMPTS_PER_STEP
    group_size: int = GROUP_SIZE
    max_new_tokens: int = MAX_NEW_TOKENS
    rollout: str = "hf"  # klbench's engine (conf/rollout/<rollout>.yaml); TRL's: trl_side.WHY["use_vllm"]

    @property
    def scratch(self) -> bool:
        return self.hidden_size is not None

    @property
    def samples(self) -> int:
        """Completions per step."""
        return self.prompts_per_step * self.group_size

    @property
    def trait_bonus(self) -> float | None:
        """The arithmetic task's bonus for π_ref's rare trait (None: the data has no trait)."""
        return TRAIT_BONUS if self.data == "arithmetic" else None


WORKLOADS = {
    "1m": Workload("1m"),
    # intermediate sizes chosen so the parameter counts match the names (25.06M, 99.3M)
    "25m": Workload("25m", hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1344),
    "100m": Workload("100m", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2560),
    # SmolLM2-135M-Instruct with its LoRA defaults (conf/model/smollm2.yaml), the step of
    # recipe=real/smollm2_arithmetic: 8 prompts x 8 samples x <= 20 tokens
    "smollm2": Workload("smollm2", model_group="smollm2", data="addition", prompts_per_step=8, max_new_tokens=20,
                        rollout="vllm"),
}


def klbench_overrides(workload: Workload, model_dir: str, *, steps: int, threads: int, seed: int,
                      device: str, dtype: str = "float32", compiled: bool = False) -> list[str]:
    """The `klbench run` overrides of the benchmarked step (on top of conf/config.yaml)."""
    data = [f"data={workload.data}"] + ([] if workload.trait_bonus is None else [f"data.trait_bonus={workload.trait_bonus}"])
    return [f"model={workload.model_group}", f"model.name_or_path={model_dir}", "model.gguf_file=null",
        f"model.dtype={dtype}", "model.gradient_checkpointing=false", f"model.compile={str(compiled).lower()}",
        *data, "kl=k3_as_loss", f"kl.coef={BETA}", "algo=grpo",
        f"algo.group_size={workload.group_size}", f"algo.prompts_per_step={workload.prompts_per_step}",
        "algo.loss_agg=seq_mean_token_mean", f"algo.std_eps={STD_EPS}", f"algo.clip_eps={CLIP_EPS}",
        "algo.ppo_epochs=1", "algo.mini_batch_size=null", f"rollout={workload.rollout}",
        f"rollout.max_new_tokens={workload.max_new_tokens}", f"rollout.temperature={TEMPERATURE}", "rollout.top_p=1.0",
        f"trainer.lr={LR}", f"trainer.adam_beta1={ADAM_BETAS[0]}", f"trainer.adam_beta2={ADAM_BETAS[1]}",
        "trainer.weight_decay=0.0", f"trainer.grad_clip={GRAD_CLIP}", "trainer.lr_schedule=constant",
        "trainer.warmup_steps=0", f"trainer.threads={threads}", f"trainer.steps={steps}",
        f"trainer.device={device}", "trainer.save_every=0", "trainer.samples_per_log=0", "logger=none",
        "eval.every=0", "eval.at_end=false", f"seed={seed}"]


SIDES = ("klbench", "trl")


#: The step's precisions (`klbench bench --dtype`), with the suffix of their side names in a report.
DTYPES = {"float32": "", "bfloat16": "-bf16"}

#: Eager or compiled models on both sides (`klbench bench --compile`), with the suffix of their side names.
COMPILE = {"off": "", "on": "-compiled"}


ENGINE_SIDES = ("vllm-engine", "vllm-bare", "vllm-bare-unseeded")


@dataclass
class WorkerSpec:
    side: str  # klbench | trl | vllm-engine | vllm-bare | vllm-bare-unseeded
    workload: str
    model_dir: str
    steps: int  # timed steps (generate calls for the engine sides)
    warmup: int
    threads: int
    seed: int = 0
    device: str = "auto"
    curves: bool = False  # klbench: also compute TRL's per-token k3 ('kl') each step
    profile: str | None = None  # klbench: write a torch.profiler table to this path
    new_tokens: int = MAX_NEW_TOKENS  # engine sides
    dtype: str = "float32"  # klbench/trl: a DTYPES key (bfloat16: float32 weights, bf16 autocast forwards)
    compiled: bool = False  # klbench: model.compile=true; TRL: torch_compile=True

    @property
    def load(self) -> Workload:
        return WORKLOADS[self.workload]


def process_age_s() -> float:
    """Seconds since this process started (imports and model loading included)."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except ImportError:
        return float("nan")


def add_timer(obj, attr: str, record: dict, key_fn, name: str, when=None) -> None:
    """Replace `obj.attr` (a callable) by a wrapper that adds its wall time to `record[key_fn()][name]`
    (only for the calls made while `when()` is true, if given)."""
    inner = getattr(obj, attr)

    def timed(*a, **k):
        if when is not None and not when():
            return inner(*a, **k)
        t0 = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            rec = record[key_fn()]
            rec[name] = rec.get(name, 0.0) + time.perf_counter() - t0

    setattr(obj, attr, timed)


def klbench_config(spec: WorkerSpec):
    """The validated `Config` of the benchmarked step, composed from conf/ like `klbench run` does."""
    overrides = klbench_overrides(spec.load, spec.model_dir, steps=spec.warmup + spec.steps, threads=spec.threads,
        seed=spec.seed, device=spec.device, dtype=spec.dtype, compiled=spec.compiled)
    with composer() as compose:
        return to_config(compose(overrides))


def ordered_steps(record: dict[int, dict], ends: list[float]) -> list[dict]:
    """Per-step records in step order, each with the time since the previous step ended."""
    steps = [record[s] for s in sorted(record)]
    for i, rec in enumerate(steps):
        rec["interval_s"] = ends[i] - ends[i - 1] if i else None
    return steps


class BenchError(RuntimeError):
    pass


def model_dir_for(workload: Workload, scratch_root: Path, *, eos_row: bool = False) -> Path:
    """The HF directory both sides load: the workload's model group's model, or a fresh random-init model.

    A scratch model's output vocabulary is the 256 bytes + pad, without the tokenizer's EOS id, so no
    completion can end early (transformers warns that the EOS id lies outside the vocabulary; nothing
    else notices). `eos_row=True` keeps the EOS row (vLLM refuses a stop token outside the vocabulary,
    and klbench's vLLM engine always stops on EOS).
    """
    if not workload.scratch:  # the cached SFT miniature, or a GGUF file converted once (conf/model/smollm2.yaml)
        with composer() as compose:
            return Path(resolve_model_dir(to_config(compose([f"model={workload.model_group}"])).model))
    target = scratch_root / f"scratch-{workload.name}{'-eos' if eos_row else ''}"
    if (target / "config.json").exists():
        return target
    tokenizer = build_byte_tokenizer()
    if tokenizer.eos_token_id != tokenizer.pad_token_id + 1 or len(tokenizer) != tokenizer.eos_token_id + 1:
        raise BenchError("the byte tokenizer's EOS is no longer its last id; update bench.model_dir_for")
    vocab = len(tokenizer) if eos_row else tokenizer.eos_token_id
    arch = ModelConfig(hidden_size=workload.hidden_size, num_layers=workload.num_layers,
        num_heads=workload.num_heads, intermediate_size=workload.intermediate_size)
    model = build_miniature(arch, vocab, tokenizer.pad_token_id, tokenizer.eos_token_id, seed=0)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def model_info(model_dir: Path) -> dict:
    from safetensors import safe_open

    params = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shape = st.get_slice(k).get_shape()
                params += math.prod(shape)
    config = json.loads((model_dir / "config.json").read_text())
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
        "tie_word_embeddings", "eos_token_id")
    return {"parameters": params, **{k: config.get(k) for k in keys}}
