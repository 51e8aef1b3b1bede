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

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from klbench import attention
from klbench.config import ModelConfig
from klbench.errors import KlbenchError
from klbench.paths import cache_root
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

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def miniature_key(cfg: ModelConfig, seed: int) -> str:
    arch = {k: getattr(cfg, k) for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size")}
    payload = json.dumps({"v": MINIATURE_VERSION, "arch": arch, "sft": asdict(cfg.sft), "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def miniature_dir(cfg: ModelConfig, seed: int = 0) -> Path:
    """Build (or reuse from the cache) the SFT-warm-started miniature; return its HF directory."""
    from filelock import FileLock

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


def resolve_model_dir(cfg: ModelConfig, seed: int = 0) -> str:
    """The directory or hub id the policy is loaded from (a local directory is checked now)."""
    if cfg.name_or_path is None:
        return str(miniature_dir(cfg))
    check_model_path(cfg.name_or_path)
    return cfg.name_or_path


def _looks_local(name: str) -> bool:
    """A path rather than a hub id ('org/name'): absolute, relative with ./ or ~, or more than one '/'."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or Path(name).exists()


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


def load_causal_lm(path: str, cfg: ModelConfig, device: torch.device, trainable: bool):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_torch_dtype(cfg.dtype, device), trust_remote_code=cfg.trust_remote_code
        )
    except Exception as e:  # noqa: BLE001 - truncated or garbage weights raise safetensors' own errors
        raise KlbenchError(_load_hint(path, e)) from e
    attention.apply(model, cfg.attn_implementation)
    model.to(device)
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
