"""Prompt templates (`data.prompt.template`): how a question becomes the text the policy continues.

  raw    the question as the dataset gives it (the synthetic task: `07+3*8=`)
  plain  `[system]\\n\\n` + question + `\\n` + instruction (default: reason step by step, answer in \\boxed{})
  chat   the tokenizer's chat template: [system message], user message = question + `\\n` + instruction,
         with the assistant turn opened (`add_generation_prompt=True`). A tokenizer without a chat
         template is an error, not a silent fallback: set data.prompt.template=plain for base models.

raw/plain text is tokenised with the tokenizer's special tokens (e.g. a BOS token where the model
expects one); chat-templated text already carries them, so it is tokenised with
`add_special_tokens=False`.
"""

from __future__ import annotations

from klbench.config import PromptConfig
from klbench.errors import KlbenchError


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def check(cfg: PromptConfig, tokenizer) -> None:
    """Fail before any work when the template cannot be applied with this tokenizer."""
    if cfg.template == "chat" and not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise KlbenchError(
            f"data.prompt.template=chat but the tokenizer of {name!r} has no chat template (a base model?); "
            "set data.prompt.template=plain, or use a model whose tokenizer_config.json has a chat_template"
        )


def _user_text(question: str, cfg: PromptConfig) -> str:
    return f"{question}\n{cfg.instruction}" if cfg.instruction else question


def render(question: str, cfg: PromptConfig, tokenizer) -> str:
    """The prompt text for `question`."""
    if cfg.template == "raw":
        return question
    if cfg.template == "plain":
        text = _user_text(question, cfg)
        return f"{cfg.system}\n\n{text}" if cfg.system else text
    check(cfg, tokenizer)
    messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages.append({"role": "user", "content": _user_text(question, cfg)})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(text: str, cfg: PromptConfig, tokenizer) -> list[int]:
    """Token ids of a rendered prompt."""
    return list(tokenizer.encode(text, add_special_tokens=cfg.template != "chat"))
