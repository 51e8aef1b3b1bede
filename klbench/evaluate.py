"""Held-out evaluation: acc@k, pass@k, maj@k and greedy accuracy, during `klbench run` and as `klbench eval`.

Pure metric functions first, then the `Evaluator` (built once, called at the steps `due` says) and
`evaluate_model` behind `klbench eval`. Which problems, which seeds, how the majority vote groups
answers and what goes to `<run_dir>/eval/` is in docs/data.md ("How evaluation works").
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from klbench import tables
from klbench.config import Config, ConfigError, DataConfig, load_preset
from klbench.data import Task, build_eval_task
from klbench.data.example import Example
from klbench.data.sources import load_examples
from klbench.models import load_causal_lm, load_tokenizer, resolve_model_dir, stop_ids
from klbench.paths import conf_dir
from klbench.provenance import git_info, machine_info
from klbench.records import write_json
from klbench.reward import RewardFn, build_reward, reward_kind, verifier
from klbench.rollout.base import RolloutBatch, SamplingParams
from klbench.rollout.factory import build_engine, check_engine
from klbench.train import runstate

log = logging.getLogger(__name__)

#: top_p of greedy decoding: below 1/vocab, so only the argmax token survives the nucleus.
GREEDY_TOP_P = 1e-9


# -- pure metric functions ----------------------------------------------------------------------------
def acc_at_k(correct: Sequence[bool]) -> float:
    """Mean accuracy of one problem's k samples."""
    return sum(map(bool, correct)) / len(correct) if correct else 0.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority(answers: Sequence[str | None], same: Callable[[str, str], bool]) -> int | None:
    """Index of the representative of the largest group of equivalent answers (None: no answers).

    Groups form in order; an answer joins the first group whose representative it is `same` as. Ties
    go to the group formed first. None answers do not vote.
    """
    groups: list[list[int]] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for g in groups:
            if same(answers[g[0]], a):
                g.append(i)
                break
        else:
            groups.append([i])
    if not groups:
        return None
    return max(groups, key=len)[0]  # max keeps the first of equal lengths


def maj_at_k(
    answers: Sequence[str | None], correct: Sequence[bool], same: Callable[[str, str], bool]
) -> bool:
    """Is the majority answer correct?"""
    rep = majority(answers, same)
    return rep is not None and bool(correct[rep])


def pass_ks(n: int) -> list[int]:
    """The k of the pass@k metrics for n samples: 2, 4, 8, ... below n, and n."""
    ks, k = [], 2
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


def dataset_metrics(name: str, records: list[dict], n: int, greedy: bool) -> dict[str, float]:
    """The eval/<name>/... metrics of per-problem records (see `Evaluator._score`)."""
    m = len(records)
    out = {f"eval/{name}/acc@{n}": sum(acc_at_k(r["correct"]) for r in records) / m}
    for k in pass_ks(n):
        out[f"eval/{name}/pass@{k}"] = sum(pass_at_k(n, sum(r["correct"]), k) for r in records) / m
    out[f"eval/{name}/maj@{n}"] = sum(r["maj_correct"] for r in records) / m
    if greedy:
        out[f"eval/{name}/greedy_acc"] = sum(r["greedy"]["correct"] for r in records) / m
    return out


# -- datasets ------------------------------------------------------------------------------------------
def load_data_preset(name: str) -> DataConfig:
    """A `conf/data/<name>.yaml` preset (or a path to such a yaml file) as a validated DataConfig."""
    presets = conf_dir() / "data"
    path = Path(name) if name.endswith((".yaml", ".yml")) else presets / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in presets.glob("*.yaml"))
        raise ConfigError(
            f"eval.datasets: no data preset {name!r}; presets: {', '.join(names)} "
            "(or give a path to a yaml file with data.* keys)"
        )
    return load_preset(path, DataConfig, "eval.datasets")


@dataclass
class EvalSet:
    name: str
    task: Task
    reward: RewardFn
    same: Callable[[str, str], bool]  # answer equivalence for maj@k
    extract: Callable[[str], str | None] | None  # answer extraction when the reward does not give one


def eval_data(cfg: Config) -> list[DataConfig]:
    """The data configs of eval.datasets (default: the run's own data).

    Datasets are prompted the way the policy is trained and used: with the run's data.prompt
    (the synthetic task keeps its own, raw, prompt).
    """
    if not cfg.eval.datasets:
        return [cfg.data]
    dcfgs = [load_data_preset(n) for n in cfg.eval.datasets]
    dcfgs = [d if d.source == "synthetic" and d.task == "miniature" else replace(d, prompt=cfg.data.prompt)
             for d in dcfgs]
    names = [d.name for d in dcfgs]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"eval.datasets: two datasets share a name ({', '.join(names)}); give each preset a name"
        )
    return dcfgs


def check_data(cfg: Config) -> None:
    """Load every eval dataset's rows once, so a bad path or row fails before a model is built or loaded."""
    for d in eval_data(cfg):
        if d.source != "synthetic":
            load_examples(d, d.eval_split or d.split)


def build_eval_sets(cfg: Config, tokenizer) -> list[EvalSet]:
    """eval.datasets (default: the run's own data), loaded and checked now."""
    sets = []
    for d in eval_data(cfg):
        task = build_eval_task(d, tokenizer, cfg.seed, cfg.eval.limit)
        kind = reward_kind(d)
        if kind == "arithmetic":
            same, extract = str.__eq__, None
        else:
            mv = verifier()
            same = partial(mv.same, timeout_s=d.reward_timeout_s)
            extract = partial(mv.extract, timeout_s=d.reward_timeout_s) if kind == "custom" else None
        sets.append(EvalSet(d.name, task, build_reward(d), same, extract))
    return sets


# -- the evaluator -------------------------------------------------------------------------------------
def decode(batch: RolloutBatch, tokenizer) -> list[tuple[str, bool]]:
    """(text without EOS, finished with EOS) of every sampled response."""
    stop = set(stop_ids(tokenizer))
    out = []
    for i in range(batch.num_samples):
        ids = batch.response_ids[i][batch.response_mask[i] > 0].tolist()
        finished = bool(ids) and ids[-1] in stop
        out.append((tokenizer.decode(ids[:-1] if finished else ids, skip_special_tokens=False), finished))
    return out


def _shard(n: int, rank: int, world: int) -> range:
    per = -(-n // world)
    return range(min(n, rank * per), min(n, (rank + 1) * per))


def _gather(dist, items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    if dist.world == 1:
        return items
    import torch.distributed as tdist

    parts: list = [None] * dist.world
    tdist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


class Evaluator:
    """Evaluates the engine's policy on the eval sets; built once, called at the steps `due` says."""

    def __init__(self, cfg: Config, tokenizer, run_dir: Path | str, dist=None):
        self.cfg, self.ecfg, self.tokenizer = cfg, cfg.eval, tokenizer
        self.run_dir = Path(run_dir)
        self.dist = dist or runstate.single_process()
        self.sets = build_eval_sets(cfg, tokenizer)
        self.max_new_tokens = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens

    def due(self, step: int, total_steps: int) -> bool:
        e = self.ecfg
        return (e.every > 0 and step % e.every == 0) or (e.at_end and step == total_steps)

    def __call__(self, policy, engine, step: int) -> dict[str, float]:
        """eval/<dataset>/... metrics of the engine's current weights; writes the per-problem files."""
        state = runstate.rng_state()
        try:
            metrics: dict[str, float] = {}
            t0 = time.perf_counter()
            for i, es in enumerate(self.sets):
                records = _gather(self.dist, self._evaluate(i, es, engine))
                metrics.update(dataset_metrics(es.name, records, self.ecfg.samples, self.ecfg.greedy))
                if self.dist.is_main:
                    self._write(es.name, step, records)
            metrics["perf/eval_s"] = time.perf_counter() - t0
            return metrics
        finally:
            runstate.set_rng_state(state)

    def _seed(self, dataset: int, chunk: int, greedy: bool) -> int:
        return (self.cfg.seed * 1_000_003 + (dataset + 1) * 104_729 + chunk * 7919 + greedy * 15_485_863) % (
            2**31
        )

    def _generate(
        self,
        engine,
        prompts: list[list[int]],
        n: int,
        top_p: float,
        temperature: float,
        dataset: int,
        chunk: int,
        greedy: bool,
    ) -> list[tuple[str, bool]]:
        params = SamplingParams(n=n, max_new_tokens=self.max_new_tokens, temperature=temperature, top_p=top_p,
            seed=self._seed(dataset, chunk, greedy))
        return decode(engine.generate(prompts, params), self.tokenizer)

    def _evaluate(self, index: int, es: EvalSet, engine) -> list[dict]:
        """Per-problem records of this rank's share of the problems."""
        k, e = self.ecfg.samples, self.ecfg
        rows = es.task.rows
        mine = _shard(len(rows), self.dist.rank, self.dist.world)
        per_call = max(1, e.batch_size // k)
        records = []
        for start in range(mine.start, mine.stop, per_call):
            chunk = start // per_call
            examples = rows[start : min(start + per_call, mine.stop)]
            prompts = [es.task.encode(ex) for ex in examples]
            sampled = self._generate(engine, prompts, k, e.top_p, e.temperature, index, chunk, greedy=False)
            greedy = (
                self._generate(engine, prompts, 1, GREEDY_TOP_P, 1.0, index, chunk, greedy=True)
                if e.greedy
                else [None] * len(examples)
            )
            for j, ex in enumerate(examples):
                records.append(self._score(es, ex, sampled[j * k : (j + 1) * k], greedy[j]))
        return records

    def _judge(self, es: EvalSet, ex: Example, text: str, finished: bool) -> dict:
        s = es.reward(text, finished, ex)
        answer = s.answer if s.answer is not None or es.extract is None else es.extract(text)
        return {"completion": text, "finished": finished, "correct": bool(s.correct), "answer": answer,
            "reward": s.reward}

    def _score(self, es: EvalSet, ex: Example, samples: list[tuple[str, bool]], greedy) -> dict:
        judged = [self._judge(es, ex, text, fin) for text, fin in samples]
        answers, correct = [j["answer"] for j in judged], [j["correct"] for j in judged]
        rep = majority(answers, es.same)
        record = {"id": ex.id, "question": ex.question, "gold": ex.answer,
            "completions": [j["completion"] for j in judged], "finished": [j["finished"] for j in judged],
            "correct": correct, "answers": answers, "rewards": [j["reward"] for j in judged],
            "maj_answer": None if rep is None else answers[rep],
            "maj_correct": rep is not None and correct[rep]}
        if greedy is not None:
            record["greedy"] = self._judge(es, ex, *greedy)
        return record

    def _write(self, name: str, step: int, records: list[dict]) -> Path:
        out = self.run_dir / "eval" / f"{name}_step{step}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return out


def build_evaluator(cfg: Config, tokenizer, run_dir: Path | str, dist=None) -> Evaluator | None:
    """The run's evaluator, or None when `eval.every == 0 and not eval.at_end`."""
    if cfg.eval.every == 0 and not cfg.eval.at_end:
        return None
    return Evaluator(cfg, tokenizer, run_dir, dist)


def training_evaluator(cfg: Config, run_dir: Path) -> Callable[..., Evaluator | None] | None:
    """What `klbench run` hands the trainer: `(tokenizer, dist) -> Evaluator`, or None when the run does
    not evaluate. The evaluation data is loaded and checked now, before any model is built."""
    if cfg.eval.every == 0 and not cfg.eval.at_end:
        return None
    check_data(cfg)
    return lambda tokenizer, dist: build_evaluator(cfg, tokenizer, run_dir, dist)


# -- `klbench eval` -------------------------------------------------------------------------------------
def table(metrics: dict[str, float], sets: list[str]) -> str:
    """One row per dataset, one column per metric (console text)."""
    cols = list(dict.fromkeys(k.split("/", 2)[2] for k in metrics if k.startswith("eval/")))
    rows = [[s, *(f"{metrics[f'eval/{s}/{c}']:.4f}" if f"eval/{s}/{c}" in metrics else "-" for c in cols)] for s in sets]
    return tables.console(["dataset", *cols], rows, "l" + "r" * len(cols))


def evaluate_model(cfg: Config, run_dir: Path) -> dict:
    """Load `model.name_or_path` (the miniature when null), evaluate it, write eval_metrics.json + per-problem files."""
    check_engine(cfg.rollout)  # before the miniature is built or a model downloaded
    check_data(cfg)
    dist = runstate.from_env()
    runstate.set_threads(cfg.trainer.threads)
    device = runstate.pick_device(cfg.trainer.device)
    model_dir = resolve_model_dir(cfg.model, seed=0)
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    evaluator = Evaluator(cfg, tokenizer, run_dir, dist)
    model = load_causal_lm(model_dir, cfg.model, device, trainable=False)
    engine = build_engine(cfg.rollout, model, tokenizer, model_dir, cfg.seed)
    try:
        t0 = time.perf_counter()
        metrics = evaluator(model, engine, step=0)
    finally:
        engine.close()
    names = [s.name for s in evaluator.sets]
    label = cfg.model.name_or_path or (f"gguf_file={cfg.model.gguf_file}" if cfg.model.gguf_file else "miniature")
    result = {"model": label, "samples": cfg.eval.samples,
        "problems": {s.name: len(s.task.rows) for s in evaluator.sets}, "metrics": metrics,
        "files": {s.name: str(Path("eval") / f"{s.name}_step0.jsonl") for s in evaluator.sets},
        "wall_s": round(time.perf_counter() - t0, 2), "git": git_info(), "machine": machine_info()}
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "eval_metrics.json", result)
        print(table(metrics, names))
        print(f"per-problem results: {run_dir / 'eval'}; metrics: {run_dir / 'eval_metrics.json'}")
    return result
