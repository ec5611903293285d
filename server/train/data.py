"""Training data of every `loraplex train --task`: reading, checking, label order and the validation split.

    seq-cls      CSV/TSV/JSONL rows: a text and a label
    pairs        rows: a text, a second text (`--text-pair-column`) and a label
    multi-label  rows: a text and several labels (a list in JSONL, else joined by `--label-separator`); an
                 empty cell or list is a row of none of the labels
    regression   rows: a text and a number; a second text too when `--text-pair-column` is given or the
                 rows have a `text_pair` column
    rerank       rows: a query, a text (`--text-pair-column`) and its relevance, a number in [0, 1] (1 or 0
                 for a relevant or irrelevant pair, or a graded score)
    embed        rows: a text and a text that should embed near it (`--text-pair-column`); no label
    tokens       JSONL rows: `tokens` (a list of words) and `tags` (one label per word)
    qa           SQuAD JSON: data[].paragraphs[].context and qas[].question / answers[].text, answer_start

Every problem is a TrainingDataError whose message names the file, the row (or the SQuAD path) and the
field, and says what to change; nothing here loads a model.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

DATA_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
TASKS = ("seq-cls", "pairs", "multi-label", "regression", "rerank", "embed", "tokens", "qa")
PAIR_COLUMN = "text_pair"  # the second text's column unless --text-pair-column names another
NO_LABELS = ("regression", "rerank", "embed", "qa")  # tasks whose head has no label names to choose
QA_LABELS = ["start", "end"]  # the question-answering head's two outputs, in head order


class TrainingDataError(ValueError):
    """Training or validation data that cannot be used as given; the message says what to change."""


@dataclass(frozen=True)
class Examples:
    """Rows of one task, in file order. Per row:

    texts   the text; the word list (tokens); the question (qa)
    labels  a label name (seq-cls, pairs); a tuple of names (multi-label); a float (regression, rerank);
            None (embed); a tag per word (tokens); the answers as (answer_start, text) tuples, none for an
            unanswerable one (qa)
    pairs   the second text (pairs, rerank, embed, regression with pairs); the context (qa); else None
    where   where the row is in its file, e.g. "line 3" or "data[0].paragraphs[1].qas[2]"
    """

    texts: list
    labels: list
    pairs: list[str] | None = None
    where: list[str] | None = None

    def pick(self, idx: list[int]) -> Examples:
        """The rows at `idx`, in that order."""
        return Examples(
            [self.texts[i] for i in idx],
            [self.labels[i] for i in idx],
            None if self.pairs is None else [self.pairs[i] for i in idx],
            None if self.where is None else [self.where[i] for i in idx],
        )


# ----------------------------------------------------------------------------------------------- reading


def read_examples(
    path: str | Path,
    *,
    task: str = "seq-cls",
    text_column: str = "text",
    label_column: str = "label",
    pair_column: str | None = None,
    separator: str = ",",
    fmt: str | None = None,
    encoding: str = "utf-8",
) -> Examples:
    """All rows of a data file for `task`; raises TrainingDataError naming the bad row and field.
    `pair_column` None is PAIR_COLUMN, which regression reads only when the rows have it."""
    path = Path(path)
    if task == "qa":
        return _read_squad(path, encoding)
    rows = _read_rows(path, fmt, encoding)
    if task == "tokens" and isinstance(rows[0][1], _CsvRow):
        raise TrainingDataError(
            f"{path}: --task tokens reads JSONL, one object per line with a list of words and a list of tags."
        )
    where, first = rows[0]
    with_pairs = task in ("pairs", "rerank", "embed") or (
        task == "regression" and (pair_column is not None or PAIR_COLUMN in first)
    )
    pair_column = pair_column or PAIR_COLUMN
    columns = [(text_column, "--text-column")]
    if with_pairs:
        columns.append((pair_column, "--text-pair-column"))
    if task != "embed":
        columns.append((label_column, "--label-column"))
    for column, option in columns:
        if column not in first:
            found = ", ".join(repr(k) for k in first) or "none"
            raise TrainingDataError(
                f"{path} has no column {column!r} ({where}); its columns are {found}. "
                f"Pass {option} to choose one."
            )
    if task == "tokens":
        return _token_rows(path, rows, text_column, label_column)

    problems: dict[str, list[str]] = {}
    texts, labels, pairs = [], [], []
    text_fields = [text_column, pair_column] if with_pairs else [text_column]
    for where, row in rows:
        for column in text_fields:
            value = row.get(column)
            if not isinstance(value, str) or not value.strip():
                problems.setdefault(f"an empty {column!r}", []).append(where)
        label, problem = _label(task, row.get(label_column), separator)
        if problem:
            problems.setdefault(problem.format(column=repr(label_column)), []).append(where)
        texts.append(row[text_column] if isinstance(row.get(text_column), str) else "")
        pairs.append(row[pair_column] if isinstance(row.get(pair_column), str) else "")
        labels.append(label)
    for problem, places in problems.items():
        fix = (
            "fill in or remove these rows"
            if problem.startswith("an empty")
            else "correct or remove these rows"
        )
        _refuse(path, problem, places, fix)
    return Examples(texts, labels, pairs if with_pairs else None, [w for w, _ in rows])


def _label(task: str, value, separator: str) -> tuple[object, str | None]:
    """(the row's label as `task` uses it, or a problem with '{column}' where the column's name goes)."""
    if task == "multi-label":
        if value is None:
            return (), "no {column} value"
        if isinstance(value, str):
            names = [s.strip() for s in value.split(separator)] if separator else [value.strip()]
        elif isinstance(value, list) and all(
            isinstance(v, str | int) and not isinstance(v, bool) for v in value
        ):
            names = [str(v).strip() for v in value]
        else:
            return (), "a {column} that is neither a list of label names nor a string of them"
        return tuple(dict.fromkeys(n for n in names if n)), None
    if task == "embed":
        return None, None
    if task in ("regression", "rerank"):
        if value is None or (isinstance(value, str) and not value.strip()):
            return 0.0, "no {column} value"
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            return 0.0, "a {column} that is not a number"
        try:
            number = float(value)
        except ValueError:
            return 0.0, "a {column} that is not a number"
        if not math.isfinite(number):
            return 0.0, "a {column} that is not a finite number"
        if task == "rerank" and not 0 <= number <= 1:
            return 0.0, "a {column} outside [0, 1] (a relevance: 1 relevant, 0 not, or a score between)"
        return number, None
    if value is None or isinstance(value, dict | list) or str(value).strip() == "":
        return "", "no {column} value"
    return str(value).strip(), None


def _token_rows(path: Path, rows: list, words_column: str, tags_column: str) -> Examples:
    words, tags = [], []
    for where, row in rows:
        tokens, labels = row[words_column], row[tags_column]
        if (
            not isinstance(tokens, list)
            or not tokens
            or not all(isinstance(t, str) and t.strip() for t in tokens)
        ):
            raise TrainingDataError(
                f"{path} {where}: {words_column!r} must be a non-empty list of non-empty words, e.g. "
                '["Ada", "lives", "in", "London"].'
            )
        if not isinstance(labels, list) or not all(
            isinstance(t, str | int) and str(t).strip() for t in labels
        ):
            raise TrainingDataError(
                f"{path} {where}: {tags_column!r} must be a list of tag names, one per word, e.g. "
                '["B-PER", "O", "O", "B-LOC"].'
            )
        if len(labels) != len(tokens):
            raise TrainingDataError(
                f"{path} {where}: {tags_column!r} has {len(labels)} tags but {words_column!r} has "
                f"{len(tokens)} words; give exactly one tag per word."
            )
        words.append(tokens)
        tags.append([str(t).strip() for t in labels])
    return Examples(words, tags, None, [w for w, _ in rows])


def _read_squad(path: Path, encoding: str) -> Examples:
    document = _open(path, encoding, lambda f: json.load(f))
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        raise TrainingDataError(
            f"{path} is not SQuAD JSON: --task qa reads an object whose 'data' lists articles with "
            "'paragraphs', each a 'context' and its 'qas'."
        )
    questions, answers, contexts, places = [], [], [], []
    for a, article in enumerate(data):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise TrainingDataError(f"{path}: data[{a}] has no 'paragraphs' list.")
        for p, paragraph in enumerate(paragraphs):
            at = f"data[{a}].paragraphs[{p}]"
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or not context.strip():
                raise TrainingDataError(f"{path}: {at} has an empty 'context'; fill it in or remove it.")
            if not isinstance(qas, list):
                raise TrainingDataError(f"{path}: {at} has no 'qas' list.")
            for q, qa in enumerate(qas):
                where = f"{at}.qas[{q}]"
                question = qa.get("question") if isinstance(qa, dict) else None
                if not isinstance(question, str) or not question.strip():
                    raise TrainingDataError(
                        f"{path}: {where} has an empty 'question'; fill it in or remove it."
                    )
                answers.append(_answers(path, where, qa, context))
                questions.append(question)
                contexts.append(context)
                places.append(where)
    if not questions:
        raise TrainingDataError(f"{path} has no questions.")
    return Examples(questions, answers, contexts, places)


def _answers(path: Path, where: str, qa: dict, context: str) -> tuple[tuple[int, str], ...]:
    """A question's answers as (answer_start, text); none when SQuAD 2.0 marks it unanswerable."""
    given = qa.get("answers", [])
    if not isinstance(given, list):
        raise TrainingDataError(f"{path}: {where}.answers must be a list of {{'text', 'answer_start'}}.")
    if qa.get("is_impossible") is True:
        return ()
    if not given:
        raise TrainingDataError(
            f'{path}: {where} has no answers; give at least one, or mark it "is_impossible": true.'
        )
    found = []
    for n, answer in enumerate(given):
        at = f"{where}.answers[{n}]"
        text = answer.get("text") if isinstance(answer, dict) else None
        start = answer.get("answer_start") if isinstance(answer, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise TrainingDataError(f"{path}: {at} has an empty 'text'.")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise TrainingDataError(f"{path}: {at} needs 'answer_start', the answer's character offset.")
        if context[start : start + len(text)] != text:
            seen = context[start : start + len(text)]
            raise TrainingDataError(
                f"{path}: {at}: 'text' {text[:60]!r} is not at 'answer_start' {start} of the context (it "
                f"holds {seen[:60]!r}); correct the offset, which counts characters from 0."
            )
        found.append((start, text))
    return tuple(found)


class _CsvRow(dict):
    """A CSV/TSV row (JSONL rows are plain dicts): some tasks need JSON values."""


def _read_rows(path: Path, fmt: str | None, encoding: str) -> list[tuple[str, dict]]:
    fmt = fmt or DATA_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise TrainingDataError(
            f"cannot tell the format of {path} from its extension; "
            "name it .csv, .tsv or .jsonl, or pass --format."
        )
    rows = _open(
        path, encoding, lambda f: list(_jsonl_rows(f, path) if fmt == "jsonl" else _csv_rows(f, path, fmt))
    )
    if not rows:
        raise TrainingDataError(f"{path} has no data rows.")
    return rows


def _open(path: Path, encoding: str, read):
    try:
        with path.open(encoding=encoding, newline="") as f:
            return read(f)
    except FileNotFoundError:
        raise TrainingDataError(f"{path} does not exist.") from None
    except IsADirectoryError:
        raise TrainingDataError(f"{path} is a directory; pass a data file.") from None
    except PermissionError:
        raise TrainingDataError(f"{path} cannot be read: permission denied.") from None
    except UnicodeDecodeError as e:
        raise TrainingDataError(
            f"{path} is not valid {encoding} (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            f"pass --encoding with the file's encoding, e.g. --encoding latin-1."
        ) from None
    except csv.Error as e:
        raise TrainingDataError(f"{path} is not a readable CSV file: {e}.") from None
    except json.JSONDecodeError as e:
        raise TrainingDataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from None


def _csv_rows(f, path: Path, fmt: str):
    reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
    if reader.fieldnames is None:
        return
    for row in reader:
        if None in row:
            raise TrainingDataError(
                f"{path} line {reader.line_num} has more fields than the header ({len(reader.fieldnames)}); "
                "quote texts that contain the delimiter."
            )
        yield f"line {reader.line_num}", _CsvRow(row)


def _jsonl_rows(f, path: Path):
    for number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainingDataError(
                f"{path} line {number} is not valid JSON ({e.msg}); write one object per line."
            ) from None
        if not isinstance(row, dict):
            raise TrainingDataError(f"{path} line {number} is a JSON {type(row).__name__}, not an object.")
        yield f"line {number}", row


def _refuse(path: Path, problem: str, places: list[str], fix: str) -> None:
    shown = ", ".join(places[:5]) + (f" and {len(places) - 5} more" if len(places) > 5 else "")
    raise TrainingDataError(f"{path}: {len(places)} row(s) have {problem} ({shown}); {fix}.")


# ------------------------------------------------------------------------------------------------ labels


def choose_labels(
    examples: Examples, wanted: list[str] | None, task: str = "seq-cls", label_column: str = "label"
) -> tuple[Examples, list[str], int]:
    """(examples restricted to the label set, labels in head order, rows left out or changed).

    Head order is `wanted` when given, else the sorted label names (numerically if all are integers).
    seq-cls and pairs leave out rows of other labels; multi-label drops other labels from each row's set;
    tokens needs every tag in `wanted`. Regression and rerank have one output named after the label
    column, qa two, embed none."""
    if task in NO_LABELS:
        if wanted:
            raise TrainingDataError(f"--labels is for the classification tasks, not --task {task}.")
        if task == "qa":
            return examples, list(QA_LABELS), 0
        if task == "embed":
            return examples, [], 0
        if len(set(examples.labels)) < 2:
            what = "a regression needs rows of different values"
            if task == "rerank":
                what = "a reranker needs relevant and irrelevant pairs"
            raise TrainingDataError(f"every {label_column!r} is {examples.labels[0]:g}; {what}.")
        return examples, [label_column], 0
    present = _present(examples, task)
    if wanted:
        unknown = [lab for lab in wanted if lab not in present]
        if unknown:
            raise TrainingDataError(
                f"--labels names {', '.join(map(repr, unknown))}, which no row has; "
                f"the data's labels are {', '.join(map(repr, _sorted_labels(present)))}."
            )
        if len(set(wanted)) != len(wanted):
            raise TrainingDataError("--labels names a label twice; list each label once.")
        labels = list(wanted)
    else:
        labels = _sorted_labels(present)
    if len(labels) < 2:
        what = "tag" if task == "tokens" else "label"
        raise TrainingDataError(
            f"the data has only one {what} ({labels[0]!r}); a classifier needs at least two {what}s."
        )
    keep = set(labels)
    if task == "tokens":
        missing = sorted(present - keep)
        if missing:
            raise TrainingDataError(
                f"the data has tags that --labels does not list: {', '.join(map(repr, missing))}; every "
                "word needs a tag of the head, so list them all."
            )
        return examples, labels, 0
    if task == "multi-label":
        sets = [tuple(lab for lab in row if lab in keep) for row in examples.labels]
        changed = sum(a != b for a, b in zip(sets, examples.labels, strict=True))
        return Examples(examples.texts, sets, examples.pairs, examples.where), labels, changed
    rows = [i for i, lab in enumerate(examples.labels) if lab in keep]
    return examples.pick(rows), labels, len(examples.labels) - len(rows)


def check_validation(
    validation: Examples, labels: list[str], wanted: list[str] | None, task: str, path
) -> Examples:
    """A --validation-file's rows under the training data's labels: those --labels leaves out dropped,
    labels the training data lacks refused."""
    if task in NO_LABELS:
        return validation
    if wanted and task in ("seq-cls", "pairs"):
        validation = validation.pick([i for i, lab in enumerate(validation.labels) if lab in set(wanted)])
    elif wanted and task == "multi-label":
        kept = [tuple(lab for lab in row if lab in set(wanted)) for row in validation.labels]
        validation = Examples(validation.texts, kept, validation.pairs, validation.where)
    if not validation.texts:
        raise TrainingDataError(f"{path} has no rows with a label from --labels.")
    unknown = sorted(_present(validation, task) - set(labels))
    if unknown:
        raise TrainingDataError(
            f"{path} has labels the training data lacks: {', '.join(map(repr, unknown))}."
        )
    return validation


def missing_labels(train: Examples, labels: list[str], task: str) -> list[str]:
    """Labels of the head that no training row has (after the validation split)."""
    if task in NO_LABELS:
        return []
    present = _present(train, task)
    return [lab for lab in labels if lab not in present]


def label_counts(examples: Examples, labels: list[str], task: str) -> str:
    """The training rows per label (words per tag for tokens), for the log."""
    if task == "embed":
        return f"{len(examples.texts)} text pairs"
    if task in ("regression", "rerank"):
        values = examples.labels
        mean = sum(values) / len(values)
        return f"{labels[0]}: mean {mean:.4g}, from {min(values):.4g} to {max(values):.4g}"
    if task == "qa":
        impossible = sum(not answers for answers in examples.labels)
        return f"{len(examples.texts)} questions, {impossible} of them unanswerable"
    if task in ("multi-label", "tokens"):
        counts = {lab: sum(row.count(lab) for row in examples.labels) for lab in labels}
    else:
        counts = {lab: examples.labels.count(lab) for lab in labels}
    return f"labels (head order): {', '.join(f'{lab} ({counts[lab]})' for lab in labels)}"


def _present(examples: Examples, task: str) -> set[str]:
    if task in ("multi-label", "tokens"):
        return {lab for row in examples.labels for lab in row}
    return set(examples.labels)


def _sorted_labels(labels: set[str]) -> list[str]:
    if all(lab.lstrip("-").isdigit() for lab in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def split_examples(examples: Examples, validation: float, seed: int) -> tuple[Examples, Examples]:
    """(train, validation): a seeded shuffle, then the first `validation` rows (a count if >= 1, else a
    fraction) are held out. The same call always gives the same split."""
    n = len(examples.texts)
    size = int(validation) if validation >= 1 else round(n * validation)
    if validation > 0 and size < 1:
        size = 1
    if size >= n:
        raise TrainingDataError(
            f"a validation split of {validation:g} leaves no training rows out of {n}; pass a smaller "
            "--validation-split."
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return examples.pick(order[size:]), examples.pick(order[:size])
