"""Datasets: presets load the real benchmarks, rows are validated, batches are a pure function of (seed, step)."""

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from klbench.config import ConfigError, DataConfig, PromptConfig, composer, to_config
from klbench.data import build_eval_task, build_task, prompts
from klbench.data.sources import REPO_ROOT, gsm8k_final, last_boxed, load_examples
from klbench.errors import KlbenchError
from klbench.evaluate import load_data_preset as load_preset
from klbench.models import build_byte_tokenizer
from klbench.reward import verifier

SIZES = {
    ("gsm8k", "train"): 7473,
    ("gsm8k", "test"): 1319,
    ("math500", "test"): 500,
    ("aime24", "test"): 30,
    ("amc23", "test"): 40,
}


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def custom(path, **kw) -> DataConfig:
    return DataConfig(name="mine", source="jsonl", path=str(path), **kw)


# -- the real benchmarks --------------------------------------------------------------------------
@pytest.mark.parametrize("name,split", list(SIZES), ids=[f"{n}-{s}" for n, s in SIZES])
def test_preset_rows_and_gold_answers(shared_data, name, split):
    cfg = load_preset(name)
    rows = load_examples(cfg, split)
    assert len(rows) == SIZES[name, split]
    assert len({r.id for r in rows}) == len(rows)
    # every gold answer is one math-verify accepts as equal to itself (as a boxed model answer)
    mv = verifier()
    golds = sorted({r.answer for r in rows})  # GSM8K's 7473 rows have far fewer distinct answers
    rejected = [g for g in golds if not mv.judge(g, f"The answer is $\\boxed{{{g}}}$.", 10.0).correct]
    assert rejected == []


def test_preset_gold_formats(shared_data):
    gsm = load_examples(load_preset("gsm8k"), "test")
    assert (gsm[0].id, gsm[0].answer) == ("0", "18")
    assert all("," not in r.answer and "####" not in r.answer for r in gsm)
    math500 = load_examples(load_preset("math500"), "test")
    assert (
        math500[0].answer == r"\left( 3, \frac{\pi}{2} \right)"
        and math500[0].id == "test/precalculus/807.json"
    )
    amc = load_examples(load_preset("amc23"), "test")
    assert amc[0].answer == "27"  # stored as the number 27.0
    assert load_examples(load_preset("aime24"), "test")[7].answer == "025"


def test_train_and_eval_tasks(shared_data, tok):
    cfg = load_preset("gsm8k")
    train = build_task(cfg, tok, seed=0)
    held_out = build_eval_task(cfg, tok, seed=0, limit=20)
    assert len(train) == 7473
    assert [r.id for r in held_out.rows] == [str(i) for i in range(20)]  # test split, file order
    assert held_out.rows[0].answer == "18"
    assert len(build_task(replace(cfg, limit=100), tok, seed=0)) == 100


def test_relative_data_root_resolves_from_repo_root(shared_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the relative path does not exist from here
    rel = Path("..") / shared_data.parent.name / shared_data.name  # the data folder, relative to the repo
    assert (REPO_ROOT / rel).resolve() == shared_data.resolve()
    monkeypatch.setenv("KLBENCH_DATA", str(rel))
    cfg = load_preset("aime24")
    assert cfg.path == str(rel / "aime24")
    assert len(load_examples(cfg, "test")) == 30


def test_default_data_root_is_the_users_cache(tmp_path, monkeypatch):
    """Without KLBENCH_DATA the presets look in the user's own cache, not beside the repository."""
    monkeypatch.delenv("KLBENCH_DATA", raising=False)
    monkeypatch.setenv("KLBENCH_CACHE", str(tmp_path / "cache"))
    assert load_preset("gsm8k").path == str(tmp_path / "cache" / "data" / "gsm8k")


def test_klbench_data_env_points_presets_elsewhere(shared_data, tmp_path, monkeypatch):
    (tmp_path / "amc23").mkdir()
    src = (shared_data / "amc23" / "test.jsonl").read_text().splitlines()[:3]
    (tmp_path / "amc23" / "test.jsonl").write_text("\n".join(src) + "\n")
    monkeypatch.setenv("KLBENCH_DATA", str(tmp_path))
    assert len(load_examples(load_preset("amc23"), "test")) == 3


# -- not found: clear errors, hub fallback ------------------------------------------------------------
def test_missing_path_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = custom("nowhere/data.jsonl")
    with pytest.raises(KlbenchError) as e:
        load_examples(cfg, "train")
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path / "nowhere/data.jsonl") in msg and str(REPO_ROOT / "nowhere/data.jsonl") in msg
    assert "data.path" in msg and "KLBENCH_DATA" in msg


def test_missing_split_file(tmp_path):
    jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "1"}])
    cfg = custom(tmp_path, eval_split="test")
    assert len(load_examples(cfg, "train")) == 1
    with pytest.raises(KlbenchError, match=r"no test\.jsonl in .*; set data\.split \(or data\.eval_split\)"):
        build_eval_task(cfg, build_byte_tokenizer(), 0, None)


def test_hub_fallback_error_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("KLBENCH_DATA", str(tmp_path / "absent"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(KlbenchError) as e:
        load_examples(load_preset("gsm8k"), "test")
    msg = str(e.value)
    assert str(tmp_path / "absent" / "gsm8k") in msg and "openai/gsm8k" in msg
    assert "KLBENCH_DATA" in msg and "data.path" in msg


@pytest.fixture
def local_hub_dataset(tmp_path):
    """A dataset folder `datasets.load_dataset` opens offline: the same code path as a cached hub id."""
    ds = tmp_path / "hub_ds"
    ds.mkdir()
    jsonl(
        ds / "train.jsonl",
        [{"problem": f"{i} + 1 = ?", "solution": f"so \\boxed{{{i + 1}}}"} for i in range(6)],
    )
    jsonl(ds / "test.jsonl", [{"problem": "2 + 2 = ?", "solution": "\\boxed{4}"}])
    return ds


def test_hub_source(local_hub_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(
        name="h",
        source="hub",
        path=str(local_hub_dataset),
        question_key="problem",
        answer_key="solution",
        answer_format="boxed",
        eval_split="test",
    )
    rows = load_examples(cfg, "train")
    assert [r.answer for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert build_eval_task(cfg, build_byte_tokenizer(), 0, None).rows[0].answer == "4"


def test_hub_fallback_when_local_root_is_missing(local_hub_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(
        name="h",
        source="jsonl",
        path=str(tmp_path / "absent"),
        hub=str(local_hub_dataset),
        hub_splits={"test": "train"},
        question_key="problem",
        answer_key="solution",
        answer_format="boxed",
    )
    assert len(load_examples(cfg, "test")) == 6  # local split 'test' is the hub's 'train'


# -- validation of rows ---------------------------------------------------------------------------------
def test_bad_row_error_names_the_row(tmp_path):
    path = jsonl(
        tmp_path / "d.jsonl",
        [
            {"question": "a", "answer": "1"},
            {"question": "b", "answer": "2"},
            {"question": "c", "solution": "3"},
        ],
    )
    with pytest.raises(KlbenchError) as e:
        load_examples(custom(path), "train")
    msg = str(e.value)
    assert msg.startswith("mine row 2 (") and f"{path}:3" in msg
    assert "has no 'answer' field (fields: question, solution); set data.answer_key" in msg
    assert "data.on_bad_row=skip" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "row,why",
    [
        ({"question": 5, "answer": "1"}, "has a int in 'question'"),
        ({"question": "   ", "answer": "1"}, "has an empty 'question'"),
        ({"question": "q", "answer": ""}, "has an empty 'answer'"),
        ({"question": "q", "answer": None}, "has no 'answer' field"),
        ({"question": "q", "answer": [1, 2]}, "has a list in 'answer'"),
        ({"question": "q", "answer": True}, "has a bool in 'answer'"),
        ("[1, 2]", "is a list, not an object"),
        ("{not json", "is not valid JSON"),
    ],
)
def test_bad_rows(tmp_path, row, why):
    path = jsonl(tmp_path / "d.jsonl", [{"question": "ok", "answer": "1"}, row])
    with pytest.raises(KlbenchError, match=f"mine row 1 .*{why}"):
        load_examples(custom(path), "train")
    kept = load_examples(custom(path, on_bad_row="skip"), "train")
    assert [r.question for r in kept] == ["ok"]


def test_all_rows_bad_is_an_error(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"q": "a", "a": "1"}])
    with pytest.raises(KlbenchError, match="no usable rows .* has no 'question' field"):
        load_examples(custom(path, on_bad_row="skip"), "train")


def test_answer_formats_and_numbers(tmp_path):
    path = jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "question": "a",
                "answer": "work\n#### 1,234",
                "sol": r"so $\boxed{\frac{1}{2}}$",
                "n": 27.0,
                "f": 2.5,
            },
        ],
    )
    assert load_examples(custom(path, answer_format="gsm8k"), "train")[0].answer == "1234"
    assert (
        load_examples(custom(path, answer_key="sol", answer_format="boxed"), "train")[0].answer
        == r"\frac{1}{2}"
    )
    assert load_examples(custom(path, answer_key="n"), "train")[0].answer == "27"
    assert load_examples(custom(path, answer_key="f"), "train")[0].answer == "2.5"
    with pytest.raises(KlbenchError, match="has no '#### <answer>'"):
        load_examples(custom(path, answer_key="sol", answer_format="gsm8k"), "train")
    with pytest.raises(KlbenchError, match=r"has no \\boxed"):
        load_examples(custom(path, answer_format="boxed"), "train")


def test_last_boxed_and_gsm8k_final():
    assert last_boxed(r"\boxed{1} then \boxed{\frac{a}{b}}.") == r"\frac{a}{b}"
    assert last_boxed(r"\boxed {x^{2}}") == "x^{2}"
    assert last_boxed(r"\boxed{unclosed") is None
    assert last_boxed(r"\boxed{}") is None
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed("no box") is None
    assert last_boxed(r"\boxed{2} \boxed{unclosed") == "2"
    t0 = time.perf_counter()
    assert last_boxed("\\boxed{" * 20_000 + "x" * 100_000) is None  # linear, not quadratic
    assert time.perf_counter() - t0 < 1.0
    assert gsm8k_final("a\n#### 1,000") == "1000"
    assert gsm8k_final("no marker") is None


def test_id_key(tmp_path):
    path = jsonl(
        tmp_path / "d.jsonl", [{"question": "a", "answer": "1", "uid": 7}, {"question": "b", "answer": "2"}]
    )
    assert [r.id for r in load_examples(custom(path), "train")] == ["0", "1"]
    with pytest.raises(KlbenchError, match="row 1 .*has no 'uid' field"):
        load_examples(custom(path, id_key="uid"), "train")


def test_filter(shared_data):
    cfg = load_preset("math500")
    level5 = load_examples(replace(cfg, filter={"level": 5}), "test")
    rows = [json.loads(ln) for ln in (shared_data / "math500" / "test.jsonl").read_text().splitlines()]
    assert len(level5) == sum(r["level"] == 5 for r in rows) > 0
    two = load_examples(replace(cfg, filter={"subject": ["Algebra", "Geometry"]}), "test")
    assert len(two) == sum(r["subject"] in ("Algebra", "Geometry") for r in rows)
    with pytest.raises(ConfigError, match="data.filter.levl: no math500 row has a field 'levl'"):
        load_examples(replace(cfg, filter={"levl": 5}), "test")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    pq.write_table(
        pa.table({"prompt": ["1+1", "2+2"], "target": [2, 4]}),
        tmp_path / "data" / "test-00000-of-00001.parquet",
    )
    cfg = DataConfig(
        name="p",
        source="parquet",
        path=str(tmp_path),
        split="test",
        question_key="prompt",
        answer_key="target",
    )
    assert [(r.question, r.answer) for r in load_examples(cfg, "test")] == [("1+1", "2"), ("2+2", "4")]


# -- batches: a pure function of (seed, step) --------------------------------------------------------------
@pytest.fixture
def ten_rows(tmp_path):
    return jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(10)])


def ids(batch):
    return [int(e.id) for e in batch]


def test_batches_are_pure_functions_of_seed_and_step(ten_rows, tok):
    a, b = build_task(custom(ten_rows), tok, seed=3), build_task(custom(ten_rows), tok, seed=3)
    assert ids(b.batch(7, 4)) == ids(a.batch(7, 4))  # no history needed: resume from the step number
    assert [ids(a.batch(s, 4)) for s in range(1, 8)] == [ids(b.batch(s, 4)) for s in range(1, 8)]
    assert ids(build_task(custom(ten_rows), tok, seed=4).batch(1, 10)) != ids(a.batch(1, 10))


def test_epochs_cover_every_row_once(ten_rows, tok):
    task = build_task(custom(ten_rows), tok, seed=0)
    stream = [i for s in range(1, 6) for i in ids(task.batch(s, 4))]  # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a fresh order each epoch
    assert ids(task.batch(3, 4)) == stream[8:12]  # a batch across the epoch boundary


def test_no_shuffle_is_file_order(ten_rows, tok):
    task = build_task(custom(ten_rows, shuffle=False), tok, seed=0)
    assert ids(task.batch(1, 4)) + ids(task.batch(2, 4)) + ids(task.batch(3, 4)) == [*range(10), 0, 1]
    assert ids(build_task(custom(ten_rows, shuffle=False, limit=3), tok, seed=0).batch(1, 5)) == [
        0,
        1,
        2,
        0,
        1,
    ]


def test_limit_picks_a_seeded_subset(ten_rows, tok):
    a = build_task(custom(ten_rows, limit=4), tok, seed=0)
    assert len(a) == 4 and set(ids(a.batch(1, 4))) == {int(r.id) for r in a.rows}
    assert [r.id for r in build_task(custom(ten_rows, limit=4), tok, seed=0).rows] == [r.id for r in a.rows]


def test_synthetic_task_unchanged(tok):
    from klbench.data import synthetic

    task = build_task(DataConfig(prompt=PromptConfig(template="raw")), tok, seed=0)
    assert task.batch(2, 3) == synthetic.problems(0, 2, 3)
    ex = task.batch(1, 1)[0]
    assert task.prompt(ex) == ex.question and task.encode(ex) == tok.encode(ex.question)
    held_out = build_eval_task(DataConfig(), tok, seed=0, limit=5)
    assert held_out.rows == synthetic.problems(0, synthetic.EVAL_STREAM, 5)


# -- prompts --------------------------------------------------------------------------------------------
class ChatTok:
    """A tokenizer stand-in that records how it was called."""

    chat_template = "{{ messages }}"
    name_or_path = "fake"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def encode(self, text, add_special_tokens):
        self.calls.append(add_special_tokens)
        return [ord(c) for c in text]


def test_prompt_templates(tok):
    q = "What is 2+2?"
    assert prompts.render(q, PromptConfig(template="raw"), tok) == q
    plain = PromptConfig(template="plain")
    assert (
        prompts.render(q, plain, tok)
        == f"{q}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    )
    assert (
        prompts.render(q, PromptConfig(template="plain", instruction="", system="Be brief."), tok)
        == f"Be brief.\n\n{q}"
    )
    chat = PromptConfig(template="chat", system="S", instruction="I")
    fake = ChatTok()
    assert prompts.render(q, chat, fake) == f"<system>S<user>{q}\nI<assistant>"
    prompts.encode("x", chat, fake)
    prompts.encode("x", plain, fake)
    assert fake.calls == [False, True]  # chat text already carries its special tokens


def test_chat_without_template_is_a_clear_error(ten_rows, tok):
    with pytest.raises(KlbenchError, match="no chat template .* set data.prompt.template=plain"):
        build_task(custom(ten_rows, prompt=PromptConfig(template="chat")), tok, seed=0)


def test_max_prompt_tokens(tmp_path, tok):
    path = jsonl(tmp_path / "d.jsonl", [{"question": "x" * n, "answer": "1"} for n in (5, 50, 10)])
    cfg = custom(path, prompt=PromptConfig(template="raw"), max_prompt_tokens=10)
    assert sorted(len(r.question) for r in build_task(cfg, tok, 0).rows) == [5, 10]
    with pytest.raises(KlbenchError, match="data.max_prompt_tokens=1"):
        build_task(replace(cfg, max_prompt_tokens=1), tok, 0)


# -- presets compose ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["arithmetic", "gsm8k", "math500", "aime24", "amc23"])
def test_presets_compose(preset):
    with composer() as compose:
        cfg = to_config(compose([f"data={preset}", "+data.filter.level=5"]))
    assert cfg.data.name == preset and cfg.data.filter == {"level": 5}


def test_generic_presets_need_a_path():
    for preset in ("jsonl", "parquet", "hub"):
        with composer() as compose:
            with pytest.raises(ConfigError, match=f"data.path=None is not valid; data.source={preset} needs data.path"):
                to_config(compose([f"data={preset}"]))
            assert to_config(compose([f"data={preset}", "data.path=x"])).data.source == preset
