"""Real datasets: find the rows (local jsonl/parquet, or the hub), validate them, turn them into `Example`s.

`data.source` jsonl/parquet: `data.path` is a file or a folder of `<split>.<ext>` (or shards); a
relative path is looked up from the current directory, then the repository root, then the preset's
`data.hub` fallback. `hub`: a hub dataset id. Every row is checked at load time, so nothing fails
mid-run (docs/data.md, "Where rows come from").
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klbench.config import ConfigError, DataConfig
from klbench.data.example import Example
from klbench.errors import KlbenchError

log = logging.getLogger(__name__)

#: The folder holding the `klbench` package: relative data paths are also looked up from here.
REPO_ROOT = Path(__file__).resolve().parents[2]
EXTENSIONS = {"jsonl": "jsonl", "parquet": "parquet"}
#: How many skipped rows are named in the warning of `data.on_bad_row=skip`.
SHOW_SKIPPED = 5

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACES = re.compile(r"[{}]")


# -- answer-field formats (data-format handling, not answer parsing) ------------------------------
def last_boxed(text: str) -> str | None:
    """The content of the last non-empty `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces matched; else None.

    One pass over the braces (linear time, whatever a policy writes).
    """
    starts = [m.end() for m in _BOXED.finditer(text)]  # just after each box's "{"
    if not starts:
        return None
    close, opened = {}, []
    for m in _BRACES.finditer(text):
        if m.group() == "{":
            opened.append(m.start())
        elif opened:
            close[opened.pop()] = m.start()
    for start in reversed(starts):
        end = close.get(start - 1)
        if end is not None and text[start:end].strip():
            return text[start:end].strip()
    return None


def gsm8k_final(text: str) -> str | None:
    """GSM8K's final answer: what follows the last `####`, thousands separators removed."""
    if "####" not in text:
        return None
    final = text.rsplit("####", 1)[1].strip().replace(",", "")
    return final or None


# -- where the rows are ----------------------------------------------------------------------------
def candidates(path: str) -> list[Path]:
    """The places a (possibly relative) path is looked up, in order."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return [p]
    out = [Path.cwd() / p, REPO_ROOT / p]
    return [c for i, c in enumerate(out) if c.resolve() not in {o.resolve() for o in out[:i]}]


def resolve_local(path: str) -> Path | None:
    """The first existing candidate of `path`, or None."""
    return next((c.resolve() for c in candidates(path) if c.exists()), None)


def split_files(root: Path, split: str, ext: str) -> list[Path]:
    """The files of `split` in a dataset folder: `<split>.<ext>`, else shards `**/<split>-*.<ext>`."""
    exact = root / f"{split}.{ext}"
    if exact.is_file():
        return [exact]
    return sorted(p for p in root.glob(f"**/{split}-*.{ext}") if p.is_file())


@dataclass(frozen=True)
class RawRow:
    index: int  # 0-based row number over the whole split
    where: str  # file:line or hub id[split] row, for messages
    data: Any


def _jsonl_rows(files: list[Path], start: int = 0) -> Iterator[RawRow]:
    index = start
    for f in files:
        with f.open("rb") as fh:
            for line_no, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    data = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    data = _Unreadable(f"is not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})")
                except json.JSONDecodeError as e:
                    data = _Unreadable(f"is not valid JSON ({e.msg})")
                yield RawRow(index, f"{f}:{line_no}", data)
                index += 1


def _parquet_rows(files: list[Path]) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = 0
    for f in files:
        try:
            table = pq.read_table(f)
        except (pa.ArrowException, OSError) as e:
            raise KlbenchError(f"{f} is not a readable parquet file ({str(e).splitlines()[0][:200]}); "
                               "check data.path and data.source") from e
        for i, data in enumerate(table.to_pylist()):
            yield RawRow(index, f"{f} row {i}", data)
            index += 1


def _hub_rows(dataset_id: str, config: str | None, split: str) -> Iterator[RawRow]:
    import datasets

    ds = datasets.load_dataset(dataset_id, name=config, split=split)
    for i, data in enumerate(ds):
        yield RawRow(i, f"{dataset_id}[{split}] row {i}", data)


@dataclass(frozen=True)
class _Unreadable:
    reason: str


def _hub_error(dataset_id: str, config: str | None, split: str, err: Exception) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    name = f"{dataset_id}" + (f" (config {config})" if config else "")
    return f"hub dataset {name} split {split!r} could not be loaded ({type(err).__name__}: {first})"


def raw_rows(cfg: DataConfig, split: str) -> tuple[list[RawRow], str]:
    """All rows of `split` and a description of where they came from; KlbenchError when not found."""
    if cfg.source == "hub":
        try:
            return list(_hub_rows(cfg.path, cfg.hub_config, split)), f"{cfg.path}[{split}]"
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean "cannot load this"
            raise KlbenchError(
                f"{cfg.name}: {_hub_error(cfg.path, cfg.hub_config, split, e)}; check data.path/data.hub_config/"
                "data.split, or download it where the hub is reachable (it is then read from the datasets cache)"
            ) from e
    ext = EXTENSIONS[cfg.source]
    root = resolve_local(cfg.path)
    if root is None:
        looked = ", ".join(str(c) for c in candidates(cfg.path))
        fix = (
            f"set data.path to a .{ext} file or folder, or KLBENCH_DATA to the folder holding the benchmark "
            "folders (relative paths are looked up from the current directory, then the repository root)"
        )
        if not cfg.hub:
            raise KlbenchError(f"{cfg.name}: data.path={cfg.path!r} not found (looked in {looked}); {fix}")
        hub_split = cfg.hub_splits.get(split, split)
        try:
            rows = list(_hub_rows(cfg.hub, cfg.hub_config, hub_split))
        except Exception as e:  # noqa: BLE001
            raise KlbenchError(
                f"{cfg.name}: data.path={cfg.path!r} not found (looked in {looked}) and the fallback "
                f"{_hub_error(cfg.hub, cfg.hub_config, hub_split, e)}; {fix}"
            ) from e
        log.info("%s: %s not found locally; read %d rows from the hub dataset %s", cfg.name, cfg.path,
            len(rows), cfg.hub)
        return rows, f"{cfg.hub}[{hub_split}]"
    if root.is_file():
        files = [root]
    else:
        files = split_files(root, split, ext)
        if not files:
            raise KlbenchError(
                f"{cfg.name}: no {split}.{ext} in {root} (nor shards {split}-*.{ext} below it); "
                f"set data.split (or data.eval_split) to a split that exists, or data.path to a .{ext} file"
            )
    rows = list(_jsonl_rows(files) if ext == "jsonl" else _parquet_rows(files))
    return rows, ", ".join(str(f) for f in files)


# -- validation -------------------------------------------------------------------------------------
class BadRow(Exception):
    """One row that cannot become an Example (the message completes 'row N ...')."""


def _field(data: dict, key: str, what: str) -> Any:
    if key not in data or data[key] is None:
        fields = ", ".join(map(str, data)) or "none"
        raise BadRow(f"has no {key!r} field (fields: {fields}); set data.{what}")
    return data[key]


def _text(value: Any, key: str, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRow(f"has a {type(value).__name__} in {key!r}, not text; set data.{what} to a text field")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadRow(f"has {value} in {key!r}")
        value = str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    if not text:
        raise BadRow(f"has an empty {key!r}")
    return text


def to_example(cfg: DataConfig, row: RawRow) -> Example:
    """One validated Example, or BadRow."""
    data = row.data
    if isinstance(data, _Unreadable):
        raise BadRow(data.reason)
    if not isinstance(data, dict):
        raise BadRow(f"is a {type(data).__name__}, not an object with fields")
    question = _field(data, cfg.question_key, "question_key")
    if not isinstance(question, str):
        raise BadRow(
            f"has a {type(question).__name__} in {cfg.question_key!r}, not text; set data.question_key"
        )
    question = _text(question, cfg.question_key, "question_key")
    answer = _text(_field(data, cfg.answer_key, "answer_key"), cfg.answer_key, "answer_key")
    if cfg.answer_format == "gsm8k":
        final = gsm8k_final(answer)
        if final is None:
            raise BadRow(
                f"has no '#### <answer>' in {cfg.answer_key!r}; set data.answer_format=plain or boxed"
            )
        answer = final
    elif cfg.answer_format == "boxed":
        final = last_boxed(answer)
        if final is None:
            raise BadRow(
                f"has no \\boxed{{...}} in {cfg.answer_key!r}; set data.answer_format=plain or data.answer_key"
            )
        answer = final
    if cfg.id_key is None:
        ex_id = str(row.index)
    else:
        ex_id = _text(_field(data, cfg.id_key, "id_key (or data.id_key=null)"), cfg.id_key, "id_key")
    return Example(id=ex_id, question=question, answer=answer)


def _matches(data: Any, wanted: dict[str, Any]) -> bool:
    if not isinstance(data, dict):
        return True  # reported as a bad row
    for key, value in wanted.items():
        allowed = value if isinstance(value, (list, tuple)) else [value]
        if key not in data or str(data[key]) not in {str(v) for v in allowed}:
            return False
    return True


def apply_filter(cfg: DataConfig, rows: list[RawRow]) -> list[RawRow]:
    """The rows whose fields equal `data.filter`'s values (a list: any of them)."""
    if not cfg.filter:
        return rows
    dicts = [r.data for r in rows if isinstance(r.data, dict)]
    for key in cfg.filter:
        if dicts and not any(key in d for d in dicts):
            fields = ", ".join(sorted({k for d in dicts[:100] for k in d}))
            raise ConfigError(f"data.filter.{key}: no {cfg.name} row has a field {key!r}; fields: {fields}")
    kept = [r for r in rows if _matches(r.data, cfg.filter)]
    log.info("%s: data.filter kept %d of %d rows", cfg.name, len(kept), len(rows))
    return kept


def load_examples(cfg: DataConfig, split: str) -> list[Example]:
    """Every usable row of `split` as an Example, in file order (filter applied, bad rows handled)."""
    rows, origin = raw_rows(cfg, split)
    rows = apply_filter(cfg, rows)
    examples, skipped = [], []  # skipped: (row number, message)
    for row in rows:
        try:
            examples.append(to_example(cfg, row))
        except BadRow as e:
            msg = f"{cfg.name} row {row.index} ({row.where}) {e}"
            if cfg.on_bad_row == "error":
                raise KlbenchError(f"{msg} (or set data.on_bad_row=skip)") from None
            skipped.append((row.index, msg))
    if skipped:
        named = ", ".join(str(i) for i, _ in skipped[:SHOW_SKIPPED]) + (
            ", ..." if len(skipped) > SHOW_SKIPPED else ""
        )
        log.warning("%s: skipped %d bad row(s) (rows %s); first: %s", cfg.name, len(skipped), named,
            skipped[0][1])
    if not examples:
        why = f"; first bad row: {skipped[0][1]}" if skipped else (" after data.filter" if cfg.filter else "")
        raise KlbenchError(f"{cfg.name}: no usable rows in {origin}{why}")
    return examples
