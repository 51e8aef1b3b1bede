"""Evaluation: hand-computed metrics, the evaluator on a scripted engine, and `klbench eval` / `run` end to end."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from klbench.config import Config, DataConfig, EvalConfig
from klbench.evaluate import (
    GREEDY_TOP_P,
    acc_at_k,
    build_evaluator,
    dataset_metrics,
    maj_at_k,
    majority,
    pass_at_k,
    pass_ks,
)
from klbench.models import build_byte_tokenizer
from klbench.reward import verifier
from klbench.rollout.base import RolloutBatch
from klbench.rollout.hf import left_pad


# -- pure metric functions ----------------------------------------------------------------------------
def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k: every k-subset holds a correct one
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 = c / n
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 2)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_acc_at_k():
    assert acc_at_k([True, False, False, True]) == 0.5
    assert acc_at_k([False] * 3) == 0.0


def test_pass_ks():
    assert pass_ks(1) == [1]
    assert pass_ks(4) == [2, 4]
    assert pass_ks(16) == [2, 4, 8, 16]
    assert pass_ks(6) == [2, 4, 6]


def test_majority_groups_by_equivalence_not_strings():
    same = verifier().same

    def eq(a, b):
        return same(a, b, 5.0)

    # 0.5, 1/2 and \frac{1}{2} are one answer (3 votes) against 3 twice
    answers = ["3", r"\frac{1}{2}", "0.5", "3", "1/2"]
    assert majority(answers, eq) == 1
    assert majority(answers, str.__eq__) == 0  # by strings, 3 would win
    assert maj_at_k(answers, [False, True, True, False, True], eq)
    # ties go to the group formed first; None answers do not vote
    assert majority(["4", "5", None, None, "5", "4"], eq) == 0
    assert majority([None, None], eq) is None
    assert not maj_at_k([None, None], [True, True], eq)


def test_dataset_metrics_hand_computed():
    records = [
        {"correct": [True, True, False, False], "maj_correct": True, "greedy": {"correct": False}},
        {"correct": [False, False, True, False], "maj_correct": False, "greedy": {"correct": True}},
    ]
    m = dataset_metrics("d", records, 4, greedy=True)
    assert m == pytest.approx(
        {
            "eval/d/acc@4": (2 / 4 + 1 / 4) / 2,
            "eval/d/pass@2": ((1 - 1 / 6) + (1 - 3 / 6)) / 2,
            "eval/d/pass@4": 1.0,
            "eval/d/maj@4": 0.5,
            "eval/d/greedy_acc": 0.5,
        }
    )


# -- the evaluator, on a scripted engine ------------------------------------------------------------------
SCRIPT = {  # question -> (gold, 4 samples, greedy)
    "half of one?": (
        r"\frac{1}{2}",
        [r"\boxed{0.5}", r"so \boxed{1/2}", r"\boxed{3}", "no idea"],
        r"\boxed{2}",
    ),
    "three plus four?": ("7", [r"\boxed{5}", r"\boxed{5}", r"\boxed{7}", r"\boxed{5.0}"], r"\boxed{7}"),
}


class ScriptedEngine:
    """Answers from SCRIPT; draws from the global RNG on purpose (the evaluator must restore it)."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def generate(self, prompts, params):
        self.calls.append(params)
        torch.rand(1), np.random.rand(), random.random()
        rows = []
        for p in prompts:
            text = self.tok.decode(p)
            q = next(q for q in SCRIPT if q in text)
            outs = [SCRIPT[q][2]] if params.top_p == GREEDY_TOP_P else SCRIPT[q][1][: params.n]
            rows += [self.tok.encode(o) + [self.tok.eos_token_id] for o in outs]
        ids, mask = left_pad([r[::-1] for r in rows], self.tok.pad_token_id)  # right-pad via reversal
        ids, mask = ids.flip(1), mask.flip(1)
        pids, pmask = left_pad(
            [p for p in prompts for _ in range(len(rows) // len(prompts))], self.tok.pad_token_id
        )
        return RolloutBatch(
            pids, pmask, ids, mask.float(), torch.zeros(ids.shape), torch.zeros(len(rows)).long()
        )


@pytest.fixture
def scripted(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps({"q": q, "a": v[0]}) + "\n" for q, v in SCRIPT.items()))
    data = DataConfig(name="mine", source="jsonl", path=str(path), question_key="q", answer_key="a")
    cfg = Config(data=data, eval=EvalConfig(samples=4, limit=None, at_end=True, batch_size=4))
    tok = build_byte_tokenizer()
    return cfg, tok, ScriptedEngine(tok)


def test_evaluator_metrics_and_files(scripted, tmp_path):
    cfg, tok, engine = scripted
    ev = build_evaluator(cfg, tok, tmp_path / "run")
    metrics = ev(None, engine, step=5)
    assert {k: v for k, v in metrics.items() if k.startswith("eval/")} == pytest.approx(
        {
            "eval/mine/acc@4": (2 / 4 + 1 / 4) / 2,
            "eval/mine/pass@2": ((1 - 1 / 6) + (1 - 3 / 6)) / 2,
            "eval/mine/pass@4": 1.0,
            "eval/mine/maj@4": 0.5,  # 0.5 ~ 1/2 win the first; 5 ~ 5.0 (wrong) win the second
            "eval/mine/greedy_acc": 0.5,
        }
    )
    records = [
        json.loads(ln) for ln in (tmp_path / "run" / "eval" / "mine_step5.jsonl").read_text().splitlines()
    ]
    assert [r["id"] for r in records] == ["0", "1"]
    first = records[0]
    assert first["question"] == "half of one?" and first["gold"] == r"\frac{1}{2}"
    assert first["completions"] == SCRIPT["half of one?"][1] and first["correct"] == [
        True,
        True,
        False,
        False,
    ]
    assert first["answers"][2] == "3" and first["answers"][3] is None
    assert first["maj_correct"] is True and records[1]["maj_correct"] is False
    assert first["greedy"]["completion"] == r"\boxed{2}" and records[1]["greedy"]["correct"] is True
    # batch_size=4 sequences per call = one problem per call; samples and greedy each
    assert [(p.n, p.top_p) for p in engine.calls] == [(4, 1.0), (1, GREEDY_TOP_P)] * 2


def test_evaluator_restores_the_global_rng(scripted, tmp_path):
    cfg, tok, engine = scripted
    ev = build_evaluator(cfg, tok, tmp_path)
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    ev(None, engine, step=1)
    after = (torch.rand(1).item(), np.random.rand(), random.random())
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    assert after == (torch.rand(1).item(), np.random.rand(), random.random())


def test_sampling_seeds_do_not_depend_on_the_step(scripted, tmp_path):
    cfg, tok, engine = scripted
    ev = build_evaluator(cfg, tok, tmp_path)
    ev(None, engine, step=1)
    first = [p.seed for p in engine.calls]
    engine.calls.clear()
    ev(None, engine, step=2)
    assert [p.seed for p in engine.calls] == first and len(set(first)) == len(first)


def test_due_and_none():
    tok = build_byte_tokenizer()
    assert build_evaluator(Config(), tok, "x") is None  # eval.every=0, at_end=false
    ev = build_evaluator(Config(eval=EvalConfig(every=3, at_end=True, limit=2)), tok, "x")
    assert [s for s in range(1, 11) if ev.due(s, 10)] == [3, 6, 9, 10]
    ev = build_evaluator(Config(eval=EvalConfig(every=0, at_end=True, limit=2)), tok, "x")
    assert [s for s in range(1, 11) if ev.due(s, 10)] == [10]
    assert len(ev.sets[0].task.rows) == 2  # the arithmetic task's held-out stream


def test_eval_datasets_presets(shared_data):
    from klbench.config import ConfigError, PromptConfig

    tok = build_byte_tokenizer()
    cfg = Config(
        data=DataConfig(prompt=PromptConfig(template="plain", instruction="Box it.")),
        eval=EvalConfig(at_end=True, datasets=["gsm8k", "amc23", "arithmetic"], limit=3),
    )
    ev = build_evaluator(cfg, tok, "x")
    assert [(s.name, len(s.task.rows)) for s in ev.sets] == [("gsm8k", 3), ("amc23", 3), ("arithmetic", 3)]
    assert ev.sets[0].task.prompt(ev.sets[0].task.rows[0]).endswith("\nBox it.")  # the run's data.prompt
    assert (
        ev.sets[2].task.prompt(ev.sets[2].task.rows[0]) == ev.sets[2].task.rows[0].question
    )  # raw stays raw
    with pytest.raises(ConfigError, match="no data preset 'gsm9k'; presets: .*gsm8k"):
        build_evaluator(Config(eval=EvalConfig(at_end=True, datasets=["gsm9k"])), tok, "x")


# -- end to end on the miniature ------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_cli_eval_gsm8k(run_cli, miniature_cache, shared_data, tmp_path):
    out = tmp_path / "ev"
    proc = run_cli("eval", "data=gsm8k", "eval.samples=2", "eval.limit=20", f"hydra.run.dir={out}")
    assert "gsm8k" in proc.stdout and "acc@2" in proc.stdout
    result = json.loads((out / "eval_metrics.json").read_text())
    assert result["problems"] == {"gsm8k": 20} and result["samples"] == 2
    for key in ("acc@2", "pass@2", "maj@2", "greedy_acc"):
        assert 0.0 <= result["metrics"][f"eval/gsm8k/{key}"] <= 1.0
    records = read_jsonl(out / "eval" / "gsm8k_step0.jsonl")
    assert [r["id"] for r in records] == [str(i) for i in range(20)]
    assert records[0]["gold"] == "18" and records[0]["question"].startswith("Janet")
    assert all(len(r["completions"]) == len(r["correct"]) == len(r["answers"]) == 2 for r in records)
    assert all("completion" in r["greedy"] for r in records)


def test_cli_run_gsm8k_smoke(run_cli, miniature_cache, shared_data, tmp_path):
    out = tmp_path / "run"
    run_cli(
        "run",
        "data=gsm8k",
        "trainer.steps=2",
        "logger=none",
        "algo.prompts_per_step=2",
        "algo.group_size=2",
        "rollout.max_new_tokens=16",
        f"hydra.run.dir={out}",
    )
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert {"reward/mean", "reward/acc", "reward/boxed", "reward/verify_timeout"} <= set(rows[0])
    assert json.loads((out / "status.json").read_text())["status"] == "completed"
    sample = read_jsonl(out / "samples.jsonl")[0]
    assert "put your final answer within \\boxed{}" in sample["prompt"]


def test_custom_benchmark_by_overrides(run_cli, miniature_cache, tmp_path):
    bench = tmp_path / "mybench"
    bench.mkdir()
    for split, n in (("train", 6), ("test", 3)):
        (bench / f"{split}.jsonl").write_text(
            "".join(
                json.dumps({"uid": f"{split}-{i}", "prompt": f"What is {i}+{i}?", "target": 2 * i}) + "\n"
                for i in range(n)
            )
        )
    fields = [
        "data=jsonl",
        "data.name=mybench",
        f"data.path={bench}",
        "data.question_key=prompt",
        "data.answer_key=target",
        "data.id_key=uid",
        "data.eval_split=test",
    ]
    run_dir = tmp_path / "run"
    run_cli(
        "run",
        *fields,
        "trainer.steps=1",
        "logger=none",
        "algo.prompts_per_step=2",
        "algo.group_size=2",
        "rollout.max_new_tokens=8",
        "eval.at_end=true",
        "eval.samples=2",
        f"hydra.run.dir={run_dir}",
    )
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval/mybench/acc@2" in r]
    assert len(evals) == 1 and evals[0]["step"] == 1
    assert [r["id"] for r in read_jsonl(run_dir / "eval" / "mybench_step1.jsonl")] == [
        "test-0",
        "test-1",
        "test-2",
    ]

    ev_dir = tmp_path / "ev"
    run_cli("eval", *fields, "eval.samples=2", "rollout.max_new_tokens=8", f"hydra.run.dir={ev_dir}")
    result = json.loads((ev_dir / "eval_metrics.json").read_text())
    assert result["problems"] == {"mybench": 3} and "eval/mybench/maj@2" in result["metrics"]


def test_eval_does_not_change_training(run_cli, miniature_cache, tmp_path):
    args = ["trainer.steps=2", "logger=none", "algo.prompts_per_step=4", "algo.group_size=2"]
    run_cli("run", *args, f"hydra.run.dir={tmp_path / 'plain'}")
    run_cli(
        "run", *args, "eval.every=1", "eval.limit=4", "eval.samples=2", f"hydra.run.dir={tmp_path / 'eval'}"
    )

    def train_rows(d):
        return [
            {k: v for k, v in r.items() if not k.startswith("perf/")}
            for r in read_jsonl(tmp_path / d / "metrics.jsonl")
            if "kl/rkl_k1" in r
        ]

    assert train_rows("eval") == train_rows("plain")
    assert [
        r["step"] for r in read_jsonl(tmp_path / "eval" / "metrics.jsonl") if "eval/arithmetic/acc@2" in r
    ] == [1, 2]
    assert (tmp_path / "eval" / "eval" / "arithmetic_step2.jsonl").exists()


def test_greedy_params_decode_the_argmax(miniature_dir):
    """top_p -> 0 in the HF engine keeps only the most likely token: greedy decoding, whatever the seed."""
    from klbench.config import ModelConfig
    from klbench.models import load_causal_lm, load_tokenizer
    from klbench.rollout.base import SamplingParams
    from klbench.rollout.hf import HFEngine

    tok = load_tokenizer(str(miniature_dir))
    model = load_causal_lm(str(miniature_dir), ModelConfig(), torch.device("cpu"), trainable=False)
    engine = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    prompts = [tok.encode("07+3*8="), tok.encode("51+9*9=")]
    runs = [
        engine.generate(prompts, SamplingParams(n=1, max_new_tokens=6, top_p=GREEDY_TOP_P, seed=s))
        for s in (1, 2)
    ]
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)
    for i, p in enumerate(prompts):  # the argmax continuation, one token at a time without a cache
        ids = list(p)
        for t in range(6):
            if runs[0].response_mask[i, t] == 0:
                break
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            assert nxt == int(runs[0].response_ids[i, t])
            ids.append(nxt)


def _rank_main(rank: int, world: int, tmp: str, data: dict) -> None:
    import torch.distributed as tdist

    from klbench.train.runstate import Dist

    tdist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        cfg = Config(
            data=DataConfig(**data), eval=EvalConfig(samples=4, limit=None, at_end=True, batch_size=4)
        )
        tok = build_byte_tokenizer()
        ev = build_evaluator(cfg, tok, Path(tmp) / f"run{rank}", Dist(rank=rank, world=world))
        metrics = ev(None, ScriptedEngine(tok), step=3)
        (Path(tmp) / f"metrics{rank}.json").write_text(json.dumps(metrics))
    finally:
        tdist.destroy_process_group()


def test_evaluator_across_two_processes(scripted, tmp_path):
    """Each rank evaluates its share; all ranks return the single-process metrics; only rank 0 writes."""
    import torch.multiprocessing as mp

    cfg, tok, engine = scripted
    single = {
        k: v for k, v in build_evaluator(cfg, tok, tmp_path / "one")(None, engine, 3).items() if "eval/" in k
    }
    data = {k: getattr(cfg.data, k) for k in ("name", "source", "path", "question_key", "answer_key")}
    mp.spawn(_rank_main, args=(2, str(tmp_path), data), nprocs=2, join=True)
    for rank in (0, 1):
        metrics = json.loads((tmp_path / f"metrics{rank}.json").read_text())
        assert {k: v for k, v in metrics.items() if "eval/" in k} == pytest.approx(single)
    assert [r["id"] for r in read_jsonl(tmp_path / "run0" / "eval" / "mine_step3.jsonl")] == ["0", "1"]
    assert not (tmp_path / "run1" / "eval").exists()
