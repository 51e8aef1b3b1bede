"""`klbench audit`: which KL term does each RL framework's *shipped* code optimise?

For every framework whose package is installed (the `audit` extra, `--no-deps`), its own KL function
is loaded from the installed files (never a copy kept here, never through the package's heavy
`__init__`), wired as the framework wires it (in the reward: its value on the rollout log-probs,
summed to go and carried by the score function; as a loss: differentiated with its aggregation) and
run through klbench.theory's exact verifier. NeMo-RL, slime and ROLL ship no usable package: their rows
run klbench presets re-implementing their published source. A framework that is not installed is
one line and skipped; one whose symbol moved is one line naming it, and the exit status is 1.
docs/audit.md describes each row's measurements and how each framework is loaded.
"""

from __future__ import annotations

import ast
import datetime
import importlib
import importlib.metadata as metadata
import importlib.util
import inspect
import json
import shlex
import sys
import time
import types
import typing
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from klbench import kl as kl_lib
from klbench import provenance, tables, theory
from klbench.config import KLConfig
from klbench.errors import ArgumentParser, writable_dir
from klbench.ops import aggregate, reverse_cumsum
from klbench.paths import conf_dir
from klbench.records import json_safe

DTYPE = theory.DTYPE
DRIFTS = (0.1, 1.0, 2.0)
#: drift and behaviour shift of the off-policy check
OFF_DRIFT, BEHAVIOUR_SHIFT = 1.0, 0.5
VOCAB, STEPS, SEED = 3, 4, 0
#: Below this error a gradient counts as exactly ∝ ∇RKL / ∇FKL. The frameworks compute in float32
#: (OpenRLHF, AReaL cast with .float()), so exact agreement is ~1e-7, not theory's 1e-15.
TOL = 1e-5
#: log-ratio grid of the clamp probe (float64) and of the finiteness probe (float32, bfloat16)
CLAMP_GRID = torch.linspace(-100, 100, 20001, dtype=DTYPE)  # step 0.01
FINITE_GRID = torch.arange(-100, 101, dtype=torch.float32)  # step 1
PRESETS_DIR = conf_dir() / "kl" / "frameworks"


class FrameworkMissing(Exception):
    """The framework's package is not installed: its rows are skipped (not an error)."""


class FrameworkBroken(Exception):
    """Installed, but the audited symbol moved or changed signature: one line, exit code 1."""


# ---------------------------------------------------------------- loading the shipped code


def installed_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError as err:
        raise FrameworkMissing(f"{dist} is not installed") from err


def installed_file(dist: str, relpath: str) -> Path:
    """A file of an installed distribution (found through its RECORD, not a hard-coded site-packages path)."""
    files = metadata.distribution(dist).files or []
    for f in files:
        if str(f).replace("\\", "/") == relpath:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise FrameworkBroken(f"{relpath} is not among the installed files")


def exec_definitions(dist: str, relpath: str, names: Sequence[str]) -> types.ModuleType:
    """The top-level functions/classes `names` of an installed source file, executed with torch in scope.

    Only those definitions run (decorators included); the file's imports do not, so packages that
    `--no-deps` left out are never needed. Code objects keep the file's name and line numbers.
    """
    path = installed_file(dist, relpath)
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    missing = [n for n in names if n not in nodes]
    if missing:
        raise FrameworkBroken(f"{relpath} defines no {', '.join(missing)}")
    # the file's own `from __future__ import ...` lines keep their meaning (lazy annotations)
    future = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    module = types.ModuleType(f"klbench_audit_{dist.replace('-', '_')}")
    module.__file__ = str(path)
    module.__dict__.update(torch=torch, **{n: getattr(typing, n) for n in typing.__all__})
    code = compile(ast.Module(body=[*future, *(nodes[n] for n in names)], type_ignores=[]), str(path), "exec")
    exec(code, module.__dict__)
    return module


def exec_module_file(
    dist: str, relpath: str, name: str, stand_ins: dict[str, types.ModuleType]
) -> types.ModuleType:
    """Execute one installed module file under its own name, with stand-in modules present only meanwhile."""
    path = installed_file(dist, relpath)
    saved = {k: sys.modules.get(k) for k in stand_ins}
    for key, mod in stand_ins.items():
        sys.modules.setdefault(key, mod)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for key, old in saved.items():
            if old is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = old
    return module


def _check_params(fn: Callable, symbol: str, required: Sequence[str]) -> None:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as err:
        raise FrameworkBroken(f"{symbol} has no readable signature") from err
    missing = [p for p in required if p not in params]
    if missing:
        raise FrameworkBroken(f"{symbol} changed signature: no parameter {', '.join(missing)}")


def _symbol(module: Any, name: str, symbol: str) -> Any:
    obj = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise FrameworkBroken(f"{symbol} not found")
        obj = getattr(obj, part)
    return obj


def _load_verl() -> types.ModuleType:
    module = exec_definitions("verl", "verl/trainer/ppo/core_algos.py", ["kl_penalty", "kl_penalty_forward"])
    _check_params(module.kl_penalty, "kl_penalty", ["logprob", "ref_logprob", "kl_penalty"])
    return module


def _load_openrlhf() -> types.ModuleType:
    stand_in = types.ModuleType("deepspeed")  # utils.py imports deepspeed for a helper the audit never calls
    module = exec_module_file("openrlhf", "openrlhf/models/utils.py", "klbench_audit_openrlhf",
        {"deepspeed": stand_in})
    fn = _symbol(module, "compute_approx_kl", "compute_approx_kl")
    _check_params(fn, "compute_approx_kl",
        ["log_probs", "log_probs_base", "log_probs_old", "kl_estimator", "unbiased_gradient"])
    return module


def _load_trl() -> types.ModuleType:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            grpo = importlib.import_module("trl.trainer.grpo_trainer")
            config = importlib.import_module("trl.trainer.grpo_config")
        except ImportError as err:
            raise FrameworkBroken(f"trl.trainer.grpo_trainer does not import ({err})") from err
    _symbol(grpo, "GRPOTrainer._compute_loss", "GRPOTrainer._compute_loss")
    _check_params(grpo.GRPOTrainer._compute_loss, "GRPOTrainer._compute_loss", ["self", "model", "inputs"])
    fields = getattr(_symbol(config, "GRPOConfig", "GRPOConfig"), "__dataclass_fields__", {})
    wanted = ("beta", "use_bias_correction_kl", "importance_sampling_level", "loss_type", "epsilon",
        "epsilon_high", "delta")
    missing = [k for k in wanted if k not in fields]
    if missing:
        raise FrameworkBroken(f"GRPOConfig has no field {', '.join(missing)}")
    module = types.ModuleType("klbench_audit_trl")
    module.GRPOTrainer = grpo.GRPOTrainer
    module.defaults = {k: fields[k].default for k in wanted}
    return module


def _load_skyrl() -> types.ModuleType:
    module = exec_definitions("skyrl-train", "skyrl_train/utils/ppo_utils.py", ["compute_approx_kl"])
    _check_params(module.compute_approx_kl, "compute_approx_kl",
        ["log_probs", "log_probs_base", "loss_mask", "kl_estimator_type"])
    return module


def _load_areal() -> types.ModuleType:
    module = exec_definitions("areal", "areal/utils/data.py", ["KLEstimator"])
    _check_params(module.KLEstimator, "KLEstimator", ["kl_estimator"])
    return module


# ---------------------------------------------------------------- frameworks and their rows

#: A loss term: (logp [B, T] with grad, ref_logp, old_logp (the rollout's, detached), mask) -> 0-dim loss.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: A reward term: (old_logp, ref_logp, mask) -> [B, T] per-token penalty (before any sum to go).
RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Framework:
    key: str
    name: str
    dist: str | None  # the package audited; None: re-implemented from source
    pin: str  # the version the audit was written against (pyproject's audit extra) or the source's
    symbol: str  # what is called
    load: Callable[[], Any] | None = None
    source: str = ""  # re-implemented: repository and commit


@dataclass(frozen=True)
class Case:
    framework: str  # Framework.key
    option: str  # the framework's own option names
    default: str  # "yes" / "no", and whether the framework turns KL on by default
    placement: str  # "loss" | "reward"
    coef: float | None  # the framework's default coefficient for this term
    make: Callable[[Any], LossFn | RewardFn]  # loaded module -> term
    preset: str | None = None  # conf/kl/frameworks/<preset>.yaml that reproduces it
    note: str = ""


AGG_NAMES = {"token-mean": "token_mean", "seq-mean-token-mean": "seq_mean_token_mean"}


def _verl_loss(name: str) -> Callable[[Any], LossFn]:
    def make(m):
        # verl/workers/utils/losses.py: kld = kl_penalty(log_prob, ref_log_prob, kl_loss_type);
        # agg_loss(kld, response_mask, loss_agg_mode="token-mean" by default)
        return lambda lp, ref, old, mask: aggregate(m.kl_penalty(lp, ref, kl_penalty=name), mask,
            "token_mean")

    return make


def _verl_reward(name: str) -> Callable[[Any], RewardFn]:
    # verl/trainer/ppo/ray_trainer.py apply_kl_penalty: kl_penalty(old_log_probs, ref_log_prob) * mask
    return lambda m: lambda old, ref, mask: m.kl_penalty(old, ref, kl_penalty=name) * mask


def _openrlhf_loss(estimator: str, unbiased: bool = False) -> Callable[[Any], LossFn]:
    def make(m):
        # openrlhf/trainer/ray/ppo_actor.py: compute_approx_kl(action_log_probs, base, log_probs_old=old, ...)
        # then aggregate_loss over the action mask (actor.loss_agg_mode default token-mean)
        def fn(lp, ref, old, mask):
            kl = m.compute_approx_kl(lp, ref, log_probs_old=old, kl_estimator=estimator,
                unbiased_gradient=unbiased)
            return aggregate(kl, mask, "token_mean")

        return fn

    return make


def _openrlhf_reward(estimator: str) -> Callable[[Any], RewardFn]:
    # openrlhf/trainer/ppo_utils/experience_maker.py: compute_approx_kl(action_log_probs, base, kl_estimator)
    return lambda m: lambda old, ref, mask: m.compute_approx_kl(old, ref, kl_estimator=estimator) * mask


class _TRLSelf:
    """The attributes `GRPOTrainer._compute_loss` reads, set as a single-process GRPOTrainer sets them."""

    def __init__(self, logp: torch.Tensor, defaults: dict, **over: Any) -> None:
        cfg = {**defaults, **over}
        self._logp = logp
        self.beta = cfg["beta"]
        self.loss_type = cfg["loss_type"]
        self.importance_sampling_level = cfg["importance_sampling_level"]
        self.epsilon_low = cfg["epsilon"]
        self.epsilon_high = cfg["epsilon_high"] if cfg["epsilon_high"] is not None else cfg["epsilon"]
        self.args = types.SimpleNamespace(use_bias_correction_kl=cfg["use_bias_correction_kl"],
            delta=cfg["delta"], steps_per_generation=1)
        self.top_entropy_quantile = 1.0
        self.off_policy_mask_threshold = None
        self.use_vllm = False
        self.vllm_importance_sampling_correction = False
        self._entropy_bonus_enabled = False
        self.aux_loss_enabled = False
        self.max_completion_length = logp.shape[1]
        self.current_gradient_accumulation_steps = 1
        self.model = types.SimpleNamespace(training=True)
        self.accelerator = types.SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x,
            gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        return self._logp, torch.zeros_like(self._logp), None


def _trl_loss(**over: Any) -> Callable[[Any], LossFn]:
    def make(m):
        def fn(lp, ref, old, mask):
            stub = _TRLSelf(lp, m.defaults, **over)
            b = lp.shape[0]
            ids = torch.zeros(lp.shape, dtype=torch.long)
            inputs = {
                "prompt_ids": torch.zeros(b, 1, dtype=torch.long),
                "prompt_mask": torch.ones(b, 1, dtype=torch.long),
                "completion_ids": ids,
                "completion_mask": mask.long(),
                "advantages": torch.zeros(b, dtype=lp.dtype),  # the policy-gradient part contributes nothing
                "old_per_token_logps": old,
                "ref_per_token_logps": ref,
                "num_items_in_batch": mask.sum(),
            }
            return m.GRPOTrainer._compute_loss(stub, None, inputs) / (stub.beta or 1.0)

        return fn

    return make


def _skyrl_loss(estimator: str) -> Callable[[Any], LossFn]:
    def make(m):
        # skyrl_train/workers/worker.py: compute_approx_kl(action_log_probs, base, loss_mask, kl_estimator_type),
        # then masked_mean(kl, loss_mask, dim=-1).mean()
        def fn(lp, ref, old, mask):
            kl = m.compute_approx_kl(lp, ref, loss_mask=mask, kl_estimator_type=estimator)
            return aggregate(kl, mask, "seq_mean_token_mean")

        return fn

    return make


def _areal_reward(estimator: str) -> Callable[[Any], RewardFn]:
    # areal/trainer/ppo/actor.py: rewards = -kl_ctl * KLEstimator(kl_estimator)(old_logp, ref_logp)
    return lambda m: lambda old, ref, mask: m.KLEstimator(estimator)(old, ref) * mask


def load_preset(name: str) -> kl_lib.KLSpec:
    """conf/kl/frameworks/<name>.yaml on the KLConfig schema, validated, as a KLSpec."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FrameworkBroken(f"preset kl=frameworks/{name} not found")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(KLConfig), OmegaConf.load(path)))
    return kl_lib.KLSpec.from_config(cfg)


def _preset_loss(name: str, agg: str, behaviour: bool = True) -> Callable[[Any], LossFn]:
    """A re-implemented loss: the preset's KLSpec. `behaviour=False`: ρ = π_θ/sg(π_θ) (NeMo-RL's default)."""

    def make(_):
        spec = load_preset(name)
        return lambda lp, ref, old, mask: spec.loss(lp, ref, mask, behaviour_logp=old if behaviour else None,
            agg=agg)

    return make


FRAMEWORKS: dict[str, Framework] = {
    f.key: f
    for f in (
        Framework("verl", "verl", "verl", "0.9.1", "verl.trainer.ppo.core_algos.kl_penalty", _load_verl),
        Framework("openrlhf", "OpenRLHF", "openrlhf", "0.11.2", "openrlhf.models.utils.compute_approx_kl",
            _load_openrlhf),
        Framework("trl", "TRL", "trl", "1.16.0", "trl.GRPOTrainer._compute_loss", _load_trl),
        Framework("skyrl", "SkyRL (skyrl-train)", "skyrl-train", "0.3.1",
            "skyrl_train.utils.ppo_utils.compute_approx_kl", _load_skyrl),
        Framework("areal", "AReaL", "areal", "1.0.4", "areal.utils.data.KLEstimator", _load_areal),
        # No usable package: klbench presets re-implement the published source (cited per preset).
        Framework("nemo_rl", "NeMo-RL", None, "0.6.0", "nemo_rl.algorithms.utils.calculate_kl",
            source="NVIDIA-NeMo/RL @ 7ea279a"),
        Framework("slime", "slime", None, "0.3.1", "slime.utils.ppo_utils.compute_approx_kl",
            source="THUDM/slime @ 624b824"),
        Framework("roll", "ROLL", None, "0.3.0", "roll.utils.functionals.compute_approx_kl",
            source="alibaba/ROLL @ 8eb27cc"),
    )
}

OFF_BY_DEFAULT = "yes (KL off by default)"
ON_BY_DEFAULT = "yes (KL on by default)"

CASES: tuple[Case, ...] = (
    # verl: algorithm.use_kl_in_reward=false, kl_penalty=kl, kl_ctrl.kl_coef=0.001;
    #       actor.use_kl_loss=false, kl_loss_type=low_var_kl, kl_loss_coef=0.001 (trainer/config/*.yaml)
    Case("verl", "use_kl_in_reward, kl_penalty=kl", OFF_BY_DEFAULT, "reward", 0.001, _verl_reward("kl"),
        "verl_kl_in_reward"),
    Case("verl", "use_kl_loss, kl_loss_type=low_var_kl", OFF_BY_DEFAULT, "loss", 0.001,
        _verl_loss("low_var_kl"), "verl_low_var_kl"),
    Case("verl", "kl_loss_type=k3+", "no", "loss", 0.001, _verl_loss("k3+"), "verl_k3_plus",
        "value of k3, gradient of k2 (straight-through)"),
    Case("verl", "kl_loss_type=mse (k2)", "no", "loss", 0.001, _verl_loss("mse")),
    Case("verl", "kl_loss_type=kl (k1)", "no", "loss", 0.001, _verl_loss("kl")),
    Case("verl", "kl_loss_type=abs", "no", "loss", 0.001, _verl_loss("abs")),
    # OpenRLHF: algo.kl.use_loss=false, estimator=k1, init_coef=0.01 (cli/train_ppo_ray.py): k1 in the reward
    Case("openrlhf", "kl.estimator=k1 (in reward)", ON_BY_DEFAULT, "reward", 0.01, _openrlhf_reward("k1"),
        "openrlhf_k1_in_reward"),
    Case("openrlhf", "kl.use_loss, estimator=k2", "no", "loss", 0.01, _openrlhf_loss("k2"),
        "openrlhf_k2_loss"),
    Case("openrlhf", "kl.use_loss, estimator=k3", "no", "loss", 0.01, _openrlhf_loss("k3"),
        "openrlhf_k3_loss"),
    Case("openrlhf", "kl.use_loss, estimator=k3, unbiased_gradient", "no", "loss", 0.01,
        _openrlhf_loss("k3", unbiased=True), "openrlhf_unbiased_gradient"),
    Case("openrlhf", "kl.use_loss, estimator=k1", "no", "loss", 0.01, _openrlhf_loss("k1")),
    # TRL GRPOConfig: beta=0.0, use_bias_correction_kl=True, importance_sampling_level=token, loss_type=dapo
    Case("trl", "beta=0.0 (defaults)", "yes (KL off: beta=0)", "loss", 0.0, _trl_loss(), None,
        "no KL term at all"),
    Case("trl", "beta>0, use_bias_correction_kl=True", "yes (when beta > 0)", "loss", None,
        _trl_loss(beta=1.0), "trl_bias_corrected_k3"),
    Case("trl", "beta>0, use_bias_correction_kl=False", "no", "loss", None,
        _trl_loss(beta=1.0, use_bias_correction_kl=False), "trl_k3"),
    Case("trl", "beta>0, importance_sampling_level=sequence", "no", "loss", None,
        _trl_loss(beta=1.0, importance_sampling_level="sequence"), None,
        "sequence weight exp(mean_t log ρ_t) broadcast onto per-token k3"),
    # skyrl-train: use_kl_loss=true, kl_estimator_type=k3, kl_loss_coef=0.001 (config/ppo_base_config.yaml)
    Case("skyrl", "use_kl_loss, kl_estimator_type=k3", ON_BY_DEFAULT, "loss", 0.001, _skyrl_loss("k3"),
        "skyrl_train_k3_loss", "compute_approx_kl runs under @torch.no_grad()"),
    Case("skyrl", "use_kl_loss, kl_estimator_type=k2", "no", "loss", 0.001, _skyrl_loss("k2")),
    # AReaL: kl_ctl=0.1, kl_estimator=k1, in the reward only (api/cli_args.py, trainer/ppo/actor.py)
    Case("areal", "kl_estimator=k1 (in reward)", ON_BY_DEFAULT, "reward", 0.1, _areal_reward("k1"),
        "areal_k1_in_reward"),
    Case("areal", "kl_estimator=k3 (in reward)", "no", "reward", 0.1, _areal_reward("k3")),
    # Re-implemented from source (see each preset's header)
    Case("nemo_rl", "reference_policy_kl_type=k3 (default)", ON_BY_DEFAULT, "loss", 0.01,
        _preset_loss("nemo_rl_default", "token_mean", behaviour=False), "nemo_rl_default",
        "k3 times exp(log π − sg log π), clamps: input ±20, output ±10"),
    Case("nemo_rl", "reference_policy_kl_type=k1", "no", "loss", 0.01,
        _preset_loss("nemo_rl_k1", "token_mean", behaviour=False), "nemo_rl_k1",
        "gradient coefficient 1 + u"),
    Case("nemo_rl", "k3, use_on_policy_kl_approximation", "no", "loss", 0.01,
        _preset_loss("nemo_rl_default", "token_mean"), "nemo_rl_default",
        "ρ = π_θ/π_gen with gradient (klbench's loop passes the rollout log-probs the same way)"),
    Case("slime", "use-kl-loss, kl-loss-type=k1 (default)", OFF_BY_DEFAULT, "loss", 0.0,
        _preset_loss("slime_default", "seq_mean_token_mean"), "slime_default"),
    Case("slime", "kl-loss-type=low_var_kl, use-unbiased-kl", "no", "loss", 0.0,
        _preset_loss("slime_low_var_kl_unbiased", "seq_mean_token_mean"), "slime_low_var_kl_unbiased",
        "ratio not detached; value clamp ±10 after the ratio, no input clamp"),
    Case("roll", "use_kl_loss (k3, hard-coded)", OFF_BY_DEFAULT, "loss", 0.0,
        _preset_loss("roll_k3_loss", "seq_mean_token_mean"), "roll_k3_loss",
        "value clamp ±10, no input clamp"),
)


# ---------------------------------------------------------------- measuring one case


@dataclass
class DriftResult:
    drift: float
    err_rkl: float | None
    err_fkl: float | None
    scale_rkl: float
    zero_vector: bool
    variance: float


@dataclass
class CaseResult:
    framework: str
    name: str
    option: str
    default: str
    placement: str
    coef: float | None
    source: str
    preset: str | None
    note: str
    verdict: str = ""
    drifts: list[DriftResult] = field(default_factory=list)
    off_policy_err_rkl: float | None = None
    no_grad: bool = False  # the term's output carries no gradient (backward raises)
    per_token: str = ""  # the per-token gradient coefficient (loss) or penalty (reward), up to a scale
    clamp_region: str = ""
    finite: dict[str, str] = field(default_factory=dict)  # dtype -> "yes" or where it is not
    nan_safe: bool = True
    error: str | None = None


def _per_sample_grads(term: LossFn | RewardFn, placement: str, theta, theta_ref, behaviour, tab, off: bool):
    """(∇loss(y) for every enumerated y `[N, D]`, no_grad flag): the framework's term on a batch of one response."""
    ref_all = theory.token_logp(theta_ref, tab.seqs, tab.prefix)  # [N, T]
    old_all = theory.token_logp(
        behaviour if off else theta, tab.seqs, tab.prefix
    ).detach()  # [N, T] rollout's
    mask_all = torch.ones_like(ref_all)
    if placement == "reward":
        # the framework's value on the detached rollout log-probs, summed to go
        coefs = reverse_cumsum(term(old_all, ref_all, mask_all).detach().to(DTYPE), mask_all)  # [N, T]
    rows, no_grad = [], False
    for n in range(tab.seqs.shape[0]):
        th = theta.detach().clone().requires_grad_(True)
        lp = theory.token_logp(th, tab.seqs[n : n + 1], tab.prefix[n : n + 1])  # [1, T]
        mask = mask_all[n : n + 1]
        if placement == "reward":
            loss = aggregate(coefs[n : n + 1] * lp, mask, "seq_mean_token_sum")  # Σ_t sg(c_t) log π(y_t)
        else:
            loss = term(lp, ref_all[n : n + 1], old_all[n : n + 1], mask)
        if not loss.requires_grad:  # e.g. computed under torch.no_grad: backward would raise
            no_grad = True
            rows.append(torch.zeros_like(th).flatten())
            continue
        (g,) = torch.autograd.grad(loss.to(DTYPE), th, allow_unused=True)
        rows.append(torch.zeros_like(th).flatten() if g is None else g.flatten())
    return torch.stack(rows), no_grad


def _intervals(grid: torch.Tensor, flags: torch.Tensor, min_run: int = 3) -> list[tuple[float, float]]:
    """Runs of True in `flags` along `grid` (at least `min_run` points: isolated zeros such as u = 0 don't count)."""
    out, start = [], None
    vals = flags.tolist() + [False]
    for i, v in enumerate(vals):
        if v and start is None:
            start = i
        elif not v and start is not None:
            if i - start >= min_run:
                out.append((float(grid[start]), float(grid[i - 1])))
            start = None
    return out


def _fmt_intervals(runs: list[tuple[float, float]], lo: float, hi: float, digits: int = 2) -> str:
    if not runs:
        return "none"
    parts = []
    for a, b in runs:
        if a <= lo and b >= hi:
            return "everywhere"
        if a <= lo:
            parts.append(f"u ≤ {b:.{digits}f}")
        elif b >= hi:
            parts.append(f"u ≥ {a:.{digits}f}")
        else:
            parts.append(f"{a:.{digits}f} ≤ u ≤ {b:.{digits}f}")
    return " or ".join(parts).replace("-", "−")


def _probe_logps(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log π and log π_ref (both ≤ 0) with log π − log π_ref = u, one token per sequence `[G, 1]`."""
    logp = torch.minimum(u, torch.zeros_like(u))
    return logp.unsqueeze(-1), (logp - u).unsqueeze(-1)


def _token_slopes(term, placement: str, u: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(per-token d loss/d log π (loss) or d value/d log π (reward), the value (reward) or None), float64.

    One token per response, so each entry is that token's own: `[G]`. None where nothing is differentiable.
    """
    logp, ref = _probe_logps(u)
    logp = logp.requires_grad_(True)
    mask = torch.ones_like(ref)
    value = None
    if placement == "loss":
        out = term(logp, ref, logp.detach(), mask)
    else:
        value = term(logp, ref, mask)
        out = value.sum()
        value = value.detach().squeeze(-1).to(DTYPE)
    if not out.requires_grad:
        return None, value
    (g,) = torch.autograd.grad(out, logp, allow_unused=True)
    return (None if g is None else g.squeeze(-1).to(DTYPE)), value


def _flat(g: torch.Tensor | None, placement: str) -> torch.Tensor:
    """Where the probe counts as zero: the gradient is exactly 0 (loss); the value is frozen (reward: its
    slope is 0, or not finite where a float32 exp overflowed into the clamp)."""
    if g is None:
        return torch.ones(len(CLAMP_GRID), dtype=torch.bool)
    return (g == 0) if placement == "loss" else (g == 0) | ~torch.isfinite(g)


def _refine(term, placement: str, inside: float, outside: float, iters: int = 40) -> float:
    """Bisect the boundary of the flat region between a flat grid point `inside` and a live one `outside`."""
    for _ in range(iters):
        mid = 0.5 * (inside + outside)
        g, _ = _token_slopes(term, placement, torch.tensor([mid], dtype=DTYPE))
        if bool(_flat(g, placement)[0]):
            inside = mid
        else:
            outside = mid
    return 0.5 * (inside + outside)


def _clamp_region(term, placement: str) -> str:
    """Where the per-token gradient (loss) is exactly zero or the value (reward) frozen, in u (float64).

    Boundaries are found on a 0.01 grid, then bisected; printed to 2 decimals with < / >.
    """
    g, _ = _token_slopes(term, placement, CLAMP_GRID)
    if g is None:
        return "everywhere (no gradient)" if placement == "loss" else "n/a (value not differentiable)"
    flat = _flat(g, placement)
    runs = _intervals(CLAMP_GRID, flat)
    if not runs:
        return "none"
    lo, hi, step = float(CLAMP_GRID[0]), float(CLAMP_GRID[-1]), float(CLAMP_GRID[1] - CLAMP_GRID[0])
    parts = []
    for a, b in runs:
        if a <= lo and b >= hi:
            return "everywhere" if placement == "loss" else "value constant everywhere"
        left = None if a <= lo else _refine(term, placement, a, a - step)
        right = None if b >= hi else _refine(term, placement, b, b + step)
        if left is None:
            parts.append(f"u < {right:.2f}")
        elif right is None:
            parts.append(f"u > {left:.2f}")
        else:
            parts.append(f"{left:.2f} < u < {right:.2f}")
    text = " or ".join(parts).replace("-", "−")
    return text if placement == "loss" else f"value frozen: {text}"


#: Per-token gradient coefficients (loss: d loss/d log π) and penalties (reward) the probe recognises.
COEFFICIENTS = {"0": lambda u: torch.zeros_like(u), "1 (k1's)": lambda u: torch.ones_like(u),
    "u (k2's)": lambda u: u, "1 − e^−u (k3's)": lambda u: -torch.expm1(-u), "1 + u (ρ·k1's)": lambda u: 1 + u,
    "sign(u) (abs's)": torch.sign}
PENALTIES = {"k1 = u": lambda u: u, "k2 = u²/2": lambda u: 0.5 * u * u,
    "k3 = e^−u − 1 + u": lambda u: torch.expm1(-u) + u, "|u|": torch.abs}
#: Where the probe reads the shape: |u| ≤ 2, inside every clamp the frameworks use
SHAPE_GRID = torch.linspace(-2, 2, 401, dtype=DTYPE)


def per_token_form(term, placement: str) -> str:
    """Which per-token coefficient (loss) or penalty (reward) the term has for |u| ≤ 2, up to a positive scale."""
    g, value = _token_slopes(term, placement, SHAPE_GRID)
    y = value if placement == "reward" else g
    if y is None or not bool(torch.isfinite(y).all()):
        return "no gradient" if placement == "loss" else "—"
    if placement == "loss" and bool((y == 0).all()):
        return "0"
    table = PENALTIES if placement == "reward" else {k: f for k, f in COEFFICIENTS.items() if k != "0"}
    for name, f in table.items():
        ref = f(SHAPE_GRID)
        err, _, c = theory.compare(y, ref)
        if c > 0 and err < 1e-6:
            return name
    return "other"


def _finiteness(term, placement: str, dtype: torch.dtype) -> tuple[str, bool]:
    """Whether value and gradient are finite for u ∈ {−100, …, 100} in `dtype`; (text, ok)."""
    grid = FINITE_GRID.to(dtype)
    bad_value, bad_grad = torch.zeros(len(grid), dtype=torch.bool), torch.zeros(len(grid), dtype=torch.bool)
    if placement == "reward":  # elementwise: one call; the value is what training uses (detached)
        logp, ref = _probe_logps(grid)
        logp = logp.requires_grad_(True)
        value = term(logp, ref, torch.ones_like(ref))
        bad_value = ~torch.isfinite(value.squeeze(-1))
        if value.requires_grad:
            (g,) = torch.autograd.grad(value.sum(), logp, allow_unused=True)
            if g is not None:
                bad_grad = ~torch.isfinite(g.squeeze(-1))
    else:  # one response of one token per call: the loss aggregates
        for i in range(len(grid)):
            logp, ref = _probe_logps(grid[i : i + 1])
            logp = logp.requires_grad_(True)
            loss = term(logp, ref, logp.detach(), torch.ones_like(ref))
            bad_value[i] = not bool(torch.isfinite(loss))
            if loss.requires_grad:
                (g,) = torch.autograd.grad(loss, logp, allow_unused=True)
                bad_grad[i] = g is not None and not bool(torch.isfinite(g).all())
    u = grid.to(torch.float32)
    parts = []
    if bad_value.any():
        parts.append("value non-finite at " + _fmt_intervals(_intervals(u, bad_value, 1), -100, 100, 0))
    if bad_grad.any():
        what = "derivative (unused, detached)" if placement == "reward" else "gradient"
        parts.append(f"{what} non-finite at " + _fmt_intervals(_intervals(u, bad_grad, 1), -100, 100, 0))
    ok = not bad_value.any() and (placement == "reward" or not bad_grad.any())
    return ("; ".join(parts) if parts else "yes"), ok


def verdict(res: CaseResult) -> str:
    """∇RKL / ∇FKL (∝, within TOL at every drift) / zero / other."""
    ds = res.drifts
    if res.no_grad or all(d.zero_vector for d in ds):
        return "zero"
    if any(d.zero_vector for d in ds):
        return "other"
    if all(d.err_rkl < TOL for d in ds):
        return "∇RKL"
    if all(d.err_fkl < TOL for d in ds):
        return "∇FKL"
    return "other"


def measure(case: Case, module: Any, fw: Framework, source: str) -> CaseResult:
    term = case.make(module)
    res = CaseResult(framework=fw.key, name=fw.name, option=case.option, default=case.default,
        placement=case.placement, coef=case.coef, source=source, preset=case.preset, note=case.note)
    tab = theory.Tabular.build(VOCAB, STEPS)
    for drift in (*DRIFTS, None):  # None: the off-policy check
        off = drift is None
        theta, theta_ref, theta_mu = theory.make_policies(tab, OFF_DRIFT if off else drift, BEHAVIOUR_SHIFT,
            SEED)
        if off and case.placement == "reward":
            continue  # an in-reward term is corrected by the policy-gradient loss's ratio, not by the KL code
        g_rkl, g_fkl = theory.exact_kl_gradients(theta, theta_ref, tab)
        mu = theory.token_logp(theta_mu if off else theta, tab.seqs, tab.prefix).sum(-1).exp()  # [N]
        per_sample, no_grad = _per_sample_grads(term, case.placement, theta, theta_ref, theta_mu, tab, off)
        res.no_grad = res.no_grad or no_grad
        st = theory.gradient_stats(per_sample, mu, g_rkl.flatten(), g_fkl.flatten())
        if off:
            res.off_policy_err_rkl = None if st.zero_vector else st.err_rkl
            continue
        res.drifts.append(
            DriftResult(drift=float(drift), err_rkl=None if st.zero_vector else st.err_rkl,
                err_fkl=None if st.zero_vector else st.err_fkl,
                scale_rkl=0.0 if st.zero_vector else st.scale_rkl, zero_vector=st.zero_vector,
                variance=st.variance)
        )
    res.verdict = verdict(res)
    res.per_token = per_token_form(term, case.placement)
    res.clamp_region = _clamp_region(term, case.placement)
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        text, ok = _finiteness(term, case.placement, dtype)
        res.finite[name] = text
        res.nan_safe = res.nan_safe and ok
    return res


# ---------------------------------------------------------------- the audit


@dataclass
class FrameworkStatus:
    key: str
    name: str
    version: str | None  # installed version (None: not installed / re-implemented)
    pin: str
    symbol: str
    status: str  # "installed" | "re-implemented" | "missing" | "broken"
    message: str = ""


def run_audit(frameworks: Sequence[str] | None = None, cases: Sequence[Case] = CASES):
    """(statuses, results). Loads each selected framework once; a broken one is reported and skipped."""
    keys = list(FRAMEWORKS) if frameworks is None else list(frameworks)
    statuses, results = [], []
    for key in keys:
        fw = FRAMEWORKS[key]
        version, module = None, None
        try:
            if fw.dist is None:
                status, source = "re-implemented", f"re-implemented from {fw.source} ({fw.pin})"
            else:
                version = installed_version(fw.dist)
                module = fw.load()
                status, source = "installed", f"installed {version}"
            statuses.append(FrameworkStatus(key, fw.name, version, fw.pin, fw.symbol, status))
        except FrameworkMissing:
            statuses.append(
                FrameworkStatus(
                    key,
                    fw.name,
                    None,
                    fw.pin,
                    fw.symbol,
                    "missing",
                    f"{fw.name}: {fw.dist} is not installed; its rows are skipped "
                    f"(pip install --no-deps {fw.dist}=={fw.pin})",
                )
            )
            continue
        except (FrameworkBroken, ImportError, SyntaxError, OSError) as err:
            statuses.append(
                FrameworkStatus(key, fw.name, version, fw.pin, fw.symbol, "broken",
                    f"{fw.name} {version}: {fw.symbol}: {err}")
            )
            continue
        for case in (c for c in cases if c.framework == key):
            try:
                results.append(measure(case, module, fw, source))
            except Exception as err:  # noqa: BLE001 - a framework's code failing is a finding, not a crash
                st = statuses[-1]
                st.status = "broken"
                msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
                line = (
                    f"{fw.name} {version or fw.pin}: {fw.symbol} ({case.option}): {type(err).__name__}: {msg}"
                )
                st.message = f"{st.message}; {line}" if st.message else line
    return statuses, results


# ---------------------------------------------------------------- reports


def _e(x: float | None) -> str:
    return "—" if x is None else f"{x:.1e}"


def _errors(r: CaseResult) -> str:
    if r.verdict == "zero":
        return "no gradient (backward raises)" if r.no_grad else "0 vector"
    return " / ".join(_e(d.err_rkl) for d in r.drifts)


def _finite_cell(r: CaseResult) -> str:
    if all(v == "yes" for v in r.finite.values()):
        return "yes"
    return "; ".join(f"{k}: {v}" for k, v in r.finite.items() if v != "yes")


def _coef(r: CaseResult) -> str:
    return "—" if r.coef is None else f"{r.coef:g}"


#: What the review that asked for this audit reported, each as (framework, option, the claim, the check that
#: bears it out on the measured row). `markdown` marks each confirmed or refuted, beside the measurement.
FINDINGS: tuple[tuple[str, str, str, Callable[[CaseResult], bool]], ...] = (
    ("verl", "use_kl_loss, kl_loss_type=low_var_kl", "k3 passes no gradient for u < −2.61 or u > 11",
     lambda r: r.clamp_region == "u < −2.61 or u > 11.00"),
    ("verl", "kl_loss_type=k3+", "the `+` names have k2's gradient (straight-through)", lambda r: r.per_token == "u (k2's)"),
    ("openrlhf", "kl.use_loss, estimator=k2", "k2 as a loss passes no gradient for |u| > 4.47",
     lambda r: r.clamp_region == "u < −4.47 or u > 4.47"),
    ("openrlhf", "kl.use_loss, estimator=k3, unbiased_gradient", "unbiased_gradient gives w·u·∇log π",
     lambda r: r.per_token == "u (k2's)"),
    ("trl", "beta=0.0 (defaults)", "the default has no KL term (beta = 0)", lambda r: r.verdict == "zero"),
    ("trl", "beta>0, use_bias_correction_kl=True", "the default bias correction has k2's gradient even on-policy",
     lambda r: r.per_token == "u (k2's)"),
    ("trl", "beta>0, use_bias_correction_kl=True", "no clamp on exp: not finite at very negative u",
     lambda r: not r.nan_safe),
    ("trl", "beta>0, importance_sampling_level=sequence", "sequence-level IS: the gradient of neither KL",
     lambda r: all(d.err_rkl is not None and d.err_rkl > TOL and d.err_fkl > TOL for d in r.drifts)),
    ("skyrl", "use_kl_loss, kl_estimator_type=k3", "the default KL loss (under @torch.no_grad) adds no gradient",
     lambda r: r.no_grad),
    ("areal", "kl_estimator=k1 (in reward)", "in the reward only, k1, coefficient 0.1 by default: ∇RKL",
     lambda r: r.verdict == "∇RKL" and r.coef == 0.1),
    ("areal", "kl_estimator=k3 (in reward)", "k3's input is not clamped: NaN gradients at u ≈ −100",
     lambda r: "derivative" in ";".join(r.finite.values())),
    ("nemo_rl", "reference_policy_kl_type=k1", "the default weight exp(log π − sg log π) makes k1's coefficient 1 + u",
     lambda r: r.per_token.startswith("1 + u")),
    ("slime", "use-kl-loss, kl-loss-type=k1 (default)", "the default k1 loss has zero expected gradient",
     lambda r: r.verdict == "zero"),
    ("slime", "kl-loss-type=low_var_kl, use-unbiased-kl", "--use-unbiased-kl's ratio is not detached",
     lambda r: r.per_token == "u (k2's)"),
    ("roll", "use_kl_loss (k3, hard-coded)", "k3 without an input clamp: NaN gradients at very negative u",
     lambda r: not r.nan_safe),
)


def findings(results: list[CaseResult]) -> list[list[str]]:
    """One row per finding whose framework was audited: framework, claim, verdict, the measurement."""
    rows = {(r.framework, r.option): r for r in results}
    out = []
    for fw, option, claim, holds in FINDINGS:
        r = rows.get((fw, option))
        if r is not None:
            seen = (f"{r.verdict}; per token {r.per_token}; zero-gradient region {r.clamp_region}; "
                    f"finite: {_finite_cell(r)}")
            cells = [r.name, f"`{option}`: {claim}", "**confirmed**" if holds(r) else "**refuted**", seen]
            out.append([c.replace("|", "\\|") for c in cells])
    return out


def markdown(statuses: list[FrameworkStatus], results: list[CaseResult], header: dict) -> str:
    drifts = "/".join(f"{d:g}" for d in DRIFTS)
    lines = [
        "# What your framework's KL term optimises (`klbench audit`)",
        "",
        f"Command: `{header['command']}`  ",
        f"Date: {header['date']} · klbench commit {header['git'].get('commit') or '—'}"
        f"{' (dirty)' if header['git'].get('dirty') else ''} · torch {header['machine'].get('torch')} · "
        f"python {header['machine'].get('python')} · {header['machine'].get('cores')} cores · "
        f"{header['seconds']:.0f} s",
        "",
        "## Frameworks",
        "",
    ]
    where = {"installed": "installed {v}", "re-implemented": "re-implemented ({p})", "missing": "not installed",
             "broken": "installed {v}: **broken**"}
    lines.append(tables.markdown(["framework", "audited", "version", "symbol", "status"], [
        [s.name, where[s.status].format(v=s.version or "?", p=s.pin)
         + ("" if s.version in (None, s.pin) else f" (audit written for {s.pin})"),
         s.version or s.pin, f"`{s.symbol}`", s.message or "ok"] for s in statuses]))
    lines += [
        "",
        "## The table",
        "",
        f"Tabular policy V = {VOCAB}, T = {STEPS} ({VOCAB**STEPS} responses enumerated), float64 parameters, seed "
        f"{SEED}. **gradient**: the expected gradient of the term as the framework wires it is ∝ ∇KL(π_θ‖π_ref) "
        f"(∇RKL), ∝ ∇KL(π_ref‖π_θ) (∇FKL), zero, or other, with its error against ∇RKL "
        f"(min_c ‖c·g − ∇RKL‖/‖∇RKL‖, 1 = no useful component) at drifts {drifts}; exact means error < {TOL:g} "
        f"(the frameworks compute in float32). **off-policy**: the error when samples come from μ = θ + "
        f"{BEHAVIOUR_SHIFT}·ε' (drift {OFF_DRIFT:g}), the rollout log-probs passed where the framework takes "
        "them. **variance**: exact tr Cov[∇loss(y)]/‖∇RKL‖² per sample at drift 1. **per token**: the "
        "per-token gradient coefficient ∂loss/∂log π (loss) or the penalty (reward) for |u| ≤ 2, up to a positive "
        "scale. **zero-gradient region**: log-ratios u = log π − log π_ref (on [−100, 100], float64) where the "
        "per-token gradient is exactly 0 (loss: a clamp, or round-off) or the penalty frozen (reward). "
        "**NaN-safe**: value (and, for a loss, gradient) finite for every integer |u| ≤ 100 "
        "in float32 and bfloat16. In-reward terms are summed to go and carried by the score function "
        "(PPO/GAE γ = λ = 1, REINFORCE++).",
        "",
    ]

    def off(r: CaseResult) -> str:
        return _e(r.off_policy_err_rkl) if r.placement == "loss" and not r.no_grad else "—"

    variance = {id(r): next((d.variance for d in r.drifts if d.drift == 1.0), None) for r in results}
    lines.append(tables.markdown(
        ["framework", "option", "default?", "coef", "source", "gradient", f"error vs ∇RKL (drift {drifts})",
         "off-policy", "variance", "per token", "zero-gradient region (u)", "NaN-safe?"],
        [[r.name, f"`{r.option}`" + (f" ({r.note})" if r.note else ""), r.default, _coef(r), r.source,
          f"**{r.verdict}**", _errors(r), off(r), _e(variance[id(r)]), r.per_token, r.clamp_region,
          "yes" if r.nan_safe else "no: " + _finite_cell(r)] for r in results],
        "---r---rr"))
    lines += ["", "## Details", "", tables.markdown(
        ["framework", "option", "drift", "err RKL", "err FKL", "scale c (RKL)", "variance"],
        [[r.name, f"`{r.option}`", f"{d.drift:g}", _e(d.err_rkl), _e(d.err_fkl), f"{d.scale_rkl:.3g}", _e(d.variance)]
         for r in results for d in r.drifts], "--rrrrr")]
    lines += ["", "Finiteness, per dtype:", ""]
    for r in results:
        lines.append(f"- {r.name} `{r.option}`: " + "; ".join(f"{k}: {v}" for k, v in r.finite.items()))
    lines += ["", "## The review's findings, checked", "",
              tables.markdown(["framework", "finding", "verdict", "measured"], findings(results))]
    presets = sorted({r.preset for r in results if r.preset})
    lines += [
        "",
        "Presets that reproduce these terms in klbench's own runs: "
        + ", ".join(f"`kl=frameworks/{p}`" for p in presets)
        + " (conf/kl/frameworks/).",
    ]
    return "\n".join(lines) + "\n"


def text_table(statuses: list[FrameworkStatus], results: list[CaseResult]) -> str:
    lines = [s.message for s in statuses if s.status in ("missing", "broken")]
    table = tables.console(
        ["framework", "option", "gradient", "err RKL " + "/".join(f"{d:g}" for d in DRIFTS), "per token", "NaN-safe",
         "zero-gradient region"],
        [[r.name, r.option, r.verdict, _errors(r), r.per_token, "yes" if r.nan_safe else "no", r.clamp_region]
         for r in results])
    return "\n".join(lines + ([""] if lines else []) + [table])


def main(argv: list[str] | None = None) -> int:
    """`klbench audit`: print the table, write DIR/audit.md and DIR/audit.json; exit 1 if a framework broke."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(prog="klbench audit",
        description="Which KL term each RL framework's shipped code optimises, through the exact verifier.")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
        help="write DIR/audit.md and DIR/audit.json")
    parser.add_argument("--frameworks", default=None, metavar="LIST",
        help=f"comma-separated subset of {','.join(FRAMEWORKS)} (default: all)")
    args = parser.parse_args(argv)
    if args.out:
        writable_dir(args.out)
    selected = None
    if args.frameworks:
        selected = [k.strip() for k in args.frameworks.split(",") if k.strip()]
        unknown = [k for k in selected if k not in FRAMEWORKS]
        if unknown:
            parser.error(f"unknown framework(s) {', '.join(unknown)}; choose from {', '.join(FRAMEWORKS)}")
    start = time.perf_counter()
    statuses, results = run_audit(selected)
    header = {
        "command": shlex.join(["klbench", "audit", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "git": provenance.git_info(),
        "machine": provenance.machine_info(),
        "seconds": time.perf_counter() - start,
        "config": {"vocab": VOCAB, "steps": STEPS, "seed": SEED, "drifts": list(DRIFTS), "tol": TOL,
            "off_policy": {"drift": OFF_DRIFT, "behaviour_shift": BEHAVIOUR_SHIFT}},
    }
    print(text_table(statuses, results))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "audit.md").write_text(markdown(statuses, results, header))
        payload = {**header, "frameworks": [asdict(s) for s in statuses],
            "rows": [asdict(r) for r in results]}
        (args.out / "audit.json").write_text(json.dumps(json_safe(payload), indent=1, ensure_ascii=False) + "\n")
    return 1 if any(s.status == "broken" for s in statuses) else 0


if __name__ == "__main__":
    raise SystemExit(main())
