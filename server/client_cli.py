"""The Python client from a shell: `loraplex adapters`, `classify`, `embed`, `rerank`, `tokens`, `answer`.

    loraplex adapters push tweet-sentiment adapters/demo/tweet-sentiment
    loraplex adapters ls
    loraplex classify tweet-sentiment "what a lovely day" "my flight got cancelled"
    loraplex classify tweet-sentiment reviews.csv --column text --json     # JSON lines, one per row
    cat tweets.txt | loraplex classify tweet-sentiment -                    # one text per line
    loraplex embed --base "what a lovely day"
    loraplex rerank my-reranker --query "cheap flights" "flights under 50 euros" "hotel deals"
    loraplex tokens my-ner "Angela Merkel met Emmanuel Macron in Paris" --aggregation first
    loraplex answer my-qa --question "Where did they meet?" --context - < article.txt
    loraplex adapters rm tweet-sentiment

Texts are the TEXT arguments, or the lines of stdin (`-`) or of a FILE; a CSV or JSONL file (or stdin with
`--format`) gives the texts of one column (`--column`). Many texts are sent in requests of at most the
server's `max_client_batch` inputs (read from its /openapi.json, else 32), one after another, and printed in
input order. The server is `--url`, else $LORAPLEX_URL, else http://127.0.0.1:8000. Tokens come from the
server's own variables: $LORAPLEX_ADMIN_TOKEN for push and rm, $LORAPLEX_API_KEY for the rest. Output is a
table for people, or JSON with `--json`: the server's answer for TEXT arguments, one JSON object a line for
the texts of stdin or a file (printed as each request is answered). Exit codes: 0 done, 1 the server refused
or could not be reached, 2 a usage error or unreadable local input.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import httpx

from loraplex.client import DEFAULT_URL, AdapterInfo, APIError, Client
from loraplex.console import DefaultsHelpFormatter, add_version

DEFAULT_CHUNK = 32  # the server's default max_client_batch, for a server that does not publish its own
FORMATS = ("text", "csv", "tsv", "jsonl")
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class InputError(Exception):
    """Local input that cannot be read as texts (exit code 2)."""


# ------------------------------------------------------------------------------------------------ parsers


def _parser(commands: argparse._SubParsersAction, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, formatter_class=DefaultsHelpFormatter, **kwargs)
    add_version(parser)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("LORAPLEX_URL") or DEFAULT_URL,
                        help="server address (default: $LORAPLEX_URL or %(default)s)")  # fmt: skip
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    common.add_argument("--timeout", type=float, default=60.0, help="seconds per request")

    texts = argparse.ArgumentParser(add_help=False)
    texts.add_argument(
        "--format",
        choices=FORMATS,
        help="how to read FILE or stdin (default: from FILE's extension, else text)",
    )
    texts.add_argument(
        "--column", help="the CSV column or JSONL key holding the texts (default: text, or a file's only one)"
    )
    texts.add_argument(
        "--chunk-size", type=int, help="inputs per request (default: the server's max_client_batch, else 32)"
    )
    about_texts = (
        "texts; - reads stdin, and a single FILE that exists is read: one text per line, or the --column "
        "of a CSV or JSONL file"
    )

    parser = argparse.ArgumentParser(
        prog="loraplex", description="Use a loraplex server.", formatter_class=DefaultsHelpFormatter
    )
    add_version(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    adapters = _parser(commands, "adapters", help="push, list, show or remove adapters")
    actions = adapters.add_subparsers(dest="action", required=True)
    push = _parser(
        actions, "push", parents=[common], help="upload a PEFT adapter directory (create or replace)"
    )
    push.add_argument("adapter_id", metavar="ID")
    push.add_argument("directory", metavar="DIR", help="holds adapter_config.json, adapter_model.safetensors")
    push.add_argument("--labels", help="comma-separated label names in head order (default: DIR/labels.json)")
    _parser(actions, "ls", parents=[common], help="list the adapters")
    show = _parser(actions, "show", parents=[common], help="show one adapter")
    show.add_argument("adapter_id", metavar="ID")
    rm = _parser(actions, "rm", parents=[common], help="delete an adapter")
    rm.add_argument("adapter_id", metavar="ID")

    classify = _parser(commands, "classify", parents=[common, texts], help="classify texts with an adapter")
    classify.add_argument("adapter_id", metavar="ID")
    classify.add_argument("texts", metavar="TEXT", nargs="+", help=about_texts)
    classify.add_argument("--raw-scores", action="store_true", help="logits instead of probabilities")
    classify.add_argument(
        "--no-truncate",
        dest="truncate",
        action="store_false",
        help="refuse texts longer than the model maximum (default: off: they are cut)",
    )

    embed = _parser(
        commands, "embed", parents=[common, texts], help="embed texts with an adapter or the base model",
        usage="loraplex embed [-h] [options] (ID | --base) TEXT [TEXT ...]",
    )  # fmt: skip
    embed.add_argument(
        "words", metavar="[ID] TEXT", nargs="+", help=f"a FEATURE_EXTRACTION adapter, then {about_texts}"
    )
    embed.add_argument("--base", action="store_true", help="the base model's vectors: no adapter ID is given")
    as_configured = "(default: as the base's sentence-transformers config says)"
    embed.add_argument(
        "--pooling", choices=("mean", "cls", "max"), help=f"token vectors to one {as_configured}"
    )
    embed.add_argument(
        "--normalize", action=argparse.BooleanOptionalAction, help=f"unit-length vectors {as_configured}"
    )

    rerank = _parser(
        commands,
        "rerank",
        parents=[common, texts],
        help="order texts by relevance to a query (cross-encoder)",
    )
    rerank.add_argument("adapter_id", metavar="ID")
    rerank.add_argument("texts", metavar="TEXT", nargs="+", help=about_texts)
    rerank.add_argument("--query", required=True, help="what the texts are ranked against")
    rerank.add_argument("--top-n", type=int, help="print only the n best texts (default: all)")

    tokens = _parser(
        commands, "tokens", parents=[common, texts], help="find entities in texts (token classification)"
    )
    tokens.add_argument("adapter_id", metavar="ID")
    tokens.add_argument("texts", metavar="TEXT", nargs="+", help=about_texts)
    tokens.add_argument(
        "--aggregation",
        choices=("none", "simple", "first", "average", "max"),
        default="simple",
        help="how word pieces become entities, as Hugging Face's token-classification pipeline does",
    )
    tokens.add_argument(
        "--ignore-labels", help="comma-separated labels never reported as entities (default: the server's, O)"
    )

    answer = _parser(
        commands,
        "answer",
        parents=[common],
        help="answer a question with a span of its context (extractive QA)",
    )
    answer.add_argument("adapter_id", metavar="ID")
    answer.add_argument("--question", required=True, help="what to answer")
    answer.add_argument("--context", required=True, help="the text holding the answer; - reads it from stdin")
    answer.add_argument("--top-k", type=int, help="the k best answers, best first (default: the server's, 1)")
    answer.add_argument(
        "--max-answer-len", type=int, help="longest answer, in tokens (default: the server's, 15)"
    )
    answer.add_argument(
        "--handle-impossible-answer", action="store_true", help='rank the null answer ("") with the spans'
    )

    args = parser.parse_args(argv)
    if args.command == "embed":
        if args.base:
            args.adapter_id, args.texts = None, args.words
        elif len(args.words) < 2:
            embed.error("give an adapter ID and then texts, or --base and texts")
        else:
            args.adapter_id, args.texts = args.words[0], args.words[1:]
    for name in ("chunk_size", "top_n", "top_k", "max_answer_len"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------- the input


def read_texts(args: argparse.Namespace, stdin: TextIO) -> tuple[list[str], bool]:
    """The texts to send, and whether they came from stdin or a file (then --json prints JSON lines)."""
    sources = args.texts
    path = Path(sources[0]) if len(sources) == 1 and sources[0] != "-" else None
    if sources != ["-"] and not (path is not None and path.is_file()):
        if args.format or args.column:
            raise InputError(f"{sources[0]}: no such file (--format and --column read a file or stdin).")
        return list(sources), False
    fmt = args.format or (EXTENSIONS.get(path.suffix.lower(), "text") if path else "text")
    if fmt == "text" and args.column:
        raise InputError("--column needs a CSV or JSONL input; pass --format csv or --format jsonl.")
    name = str(path) if path else "stdin"
    if path is None:
        return _parse(stdin, fmt, args.column, name), True
    with path.open(encoding="utf-8", newline="") as f:
        return _parse(f, fmt, args.column, name), True


def _parse(lines: TextIO, fmt: str, column: str | None, name: str) -> list[str]:
    if fmt == "text":
        return [line.rstrip("\r\n") for line in lines if line.strip()]
    if fmt in ("csv", "tsv"):
        reader = csv.DictReader(lines, delimiter="," if fmt == "csv" else "\t")
        key = _column(column, reader.fieldnames or [], name, "column")
        rows = ((reader.line_num, row.get(key)) for row in reader)
        return [_text(value, f"{name} line {n}", key) for n, value in rows]
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise InputError(f"{name} line {n} is not JSON: {e}.") from None
        if isinstance(row, str):
            texts.append(_text(row, f"{name} line {n}", "text"))
            continue
        if not isinstance(row, dict):
            raise InputError(f"{name} line {n} is neither a JSON object nor a string.")
        key = _column(column, list(row), f"{name} line {n}", "key")
        texts.append(_text(row[key], f"{name} line {n}", key))
    return texts


def _column(column: str | None, names: Sequence[str], where: str, what: str) -> str:
    if column is None:
        column = "text" if "text" in names or len(names) != 1 else names[0]
    if column not in names:
        raise InputError(f"{where} has no {what} {column!r} (it has {', '.join(map(repr, names))}); "
                         f"name one with --column.")  # fmt: skip
    return column


def _text(value: object, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: {key!r} is {'empty' if value in ('', None) else 'not a text'}.")
    return value


# --------------------------------------------------------------------------------------------- requests


def published_limit(url: str, path: str, field: str, timeout: float) -> int:
    """The most items the server takes in `field` of POST `path` (its OpenAPI `maxItems`), else 32."""
    try:
        doc = httpx.get(url.rstrip("/") + "/openapi.json", timeout=timeout).json()
        schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        if "$ref" in schema:
            schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
        prop = schema["properties"][field]
        for option in [prop, *prop.get("anyOf", ())]:
            if option.get("type") == "array" and isinstance(option.get("maxItems"), int):
                return max(1, option["maxItems"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return DEFAULT_CHUNK


class ChunkError(Exception):
    """A request of a chunked run was refused: the server's error and the inputs it carried."""

    def __init__(self, error: APIError, start: int, end: int, total: int):
        super().__init__(str(error))
        self.error, self.start, self.end, self.total = error, start, end, total


def in_chunks(
    args: argparse.Namespace, texts: list[str], path: str, field: str, send: Callable[[list[str]], Any]
) -> Iterator[tuple[int, Any]]:
    """`send` each run of texts that fits one request, in order; yields (offset of its first text, answer)."""
    size = args.chunk_size
    if size is None:
        size = published_limit(args.url, path, field, args.timeout) if len(texts) > 1 else 1
    for start in range(0, len(texts), size):
        chunk = texts[start : start + size]
        try:
            answer = send(chunk)
        except APIError as e:
            if len(texts) <= size:
                raise
            raise ChunkError(e, start, start + len(chunk), len(texts)) from e
        yield start, answer


class Printer:
    """Where results go: JSON lines as they come (`lines`), or everything at once at the end."""

    def __init__(self, out: TextIO, as_json: bool, lines: bool):
        self.out, self.as_json, self.lines = out, as_json, lines
        self.versions: list[str] = []

    def line(self, obj: dict) -> None:
        self.out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.out.flush()

    def done(self, data: str | dict | list) -> None:
        self.out.write((json.dumps(data, indent=2, ensure_ascii=False) if self.as_json else data) + "\n")

    def version(self, version: str) -> None:
        if version not in self.versions:
            self.versions.append(version)


# -------------------------------------------------------------------------------------------------- tables


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=False)] + [str(row[-1])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB"):
        if n < 1024 or unit == "MB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} MB"


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "no"


def adapters_table(infos: list[AdapterInfo]) -> str:
    header = ("ID", "VERSION", "TASK", "ROUTE", "LABELS", "RANK", "TARGETS", "SIZE", "RESIDENT", "CREATED")
    rows = [
        (a.adapter_id, a.version, a.task_type or "-", ",".join(a.routes) or "-", ",".join(a.labels) or "-",
         "-" if a.rank is None else str(a.rank),
         ",".join(a.target_modules) or "-", _size(a.size_bytes), _yes_no(a.resident), a.created_at or "-")
        for a in infos
    ]  # fmt: skip
    return table(header, rows)


def _clip(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _heading(adapter_id: str | None, versions: list[str]) -> str:
    who = f"adapter {adapter_id}" if adapter_id is not None else "base model"
    return f"{who} version {', then '.join(versions)}"


def classification_table(
    adapter_id: str, versions: list[str], results: list[dict], texts: list[str], raw_scores: bool
) -> str:
    labels = list(results[0]["scores"]) if results else []
    fmt = "{:.4f}" if not raw_scores else "{:+.3f}"
    header = ("LABEL", "SCORE", *(lab.upper() for lab in labels), "TEXT")
    rows = [
        (r["label"], fmt.format(r["score"]), *(fmt.format(r["scores"][lab]) for lab in labels), _clip(text))
        for r, text in zip(results, texts, strict=True)
    ]
    return _heading(adapter_id, versions) + "\n" + table(header, rows)


# ------------------------------------------------------------------------------------------------ commands


def classify(args: argparse.Namespace, client: Client, texts: list[str], p: Printer) -> None:
    def send(chunk: list[str]) -> Any:
        return client.classify(args.adapter_id, chunk, truncate=args.truncate, raw_scores=args.raw_scores)

    results: list[dict] = []
    for start, answer in in_chunks(args, texts, "/classify", "inputs", send):
        p.version(answer.adapter_version)
        for i, result in enumerate(answer.raw["results"], start):
            if p.lines:
                p.line({"index": i, "text": texts[i], **result, "adapter_version": answer.adapter_version})
            results.append(result)
    if p.lines:
        return
    if p.as_json:
        p.done({"adapter_id": args.adapter_id, "adapter_version": p.versions[0], "results": results})
    else:
        p.done(classification_table(args.adapter_id, p.versions, results, texts, args.raw_scores))


def embed(args: argparse.Namespace, client: Client, texts: list[str], p: Printer) -> None:
    def send(chunk: list[str]) -> Any:
        return client.embed(args.adapter_id, chunk, pooling=args.pooling, normalize=args.normalize)

    rows = []
    for start, answer in in_chunks(args, texts, "/embed", "inputs", send):
        p.version(answer.adapter_version)
        for i, vector in enumerate(answer.vectors, start):
            if p.as_json:
                p.line({"index": i, "text": texts[i], "embedding": vector, "adapter_id": args.adapter_id,
                        "adapter_version": answer.adapter_version})  # fmt: skip
            else:
                norm = math.sqrt(sum(x * x for x in vector))
                rows.append((str(len(vector)), f"{norm:.4f}", _clip(texts[i])))
    if not p.as_json:
        p.done(_heading(args.adapter_id, p.versions) + "\n" + table(("DIMS", "NORM", "TEXT"), rows))


def rerank(args: argparse.Namespace, client: Client, texts: list[str], p: Printer) -> None:
    def send(chunk: list[str]) -> Any:
        return client.rerank(args.adapter_id, args.query, chunk)

    # Each text's score depends only on the query and that text, so the chunks' answers merge into one order.
    ranked = []
    for start, answer in in_chunks(args, texts, "/rerank", "texts", send):
        p.version(answer.adapter_version)
        ranked += [(r.score, start + r.index) for r in answer.results]
    ranked.sort(key=lambda item: (-item[0], item[1]))
    results = [{"index": i, "score": s, "text": texts[i]} for s, i in ranked[: args.top_n]]
    if p.lines:
        for rank, result in enumerate(results, 1):
            p.line({"rank": rank, **result, "adapter_version": p.versions[-1]})
    elif p.as_json:
        p.done({"adapter_id": args.adapter_id, "adapter_version": p.versions[0], "results": results})
    else:
        rows = [(str(rank), f"{r['score']:.4f}", str(r["index"]), _clip(r["text"]))
                for rank, r in enumerate(results, 1)]  # fmt: skip
        p.done(_heading(args.adapter_id, p.versions) + "\n" + table(("RANK", "SCORE", "INDEX", "TEXT"), rows))


def tokens(args: argparse.Namespace, client: Client, texts: list[str], p: Printer) -> None:
    ignore = (
        None
        if args.ignore_labels is None
        else [s.strip() for s in args.ignore_labels.split(",") if s.strip()]
    )

    def send(chunk: list[str]) -> Any:
        return client.tokens(args.adapter_id, chunk, args.aggregation, ignore_labels=ignore)

    results: list[list[dict]] = []
    for start, answer in in_chunks(args, texts, "/tokens", "inputs", send):
        p.version(answer.adapter_version)
        for i, entities in enumerate(answer.raw["results"], start):
            if p.lines:
                p.line({"index": i, "text": texts[i], "entities": entities,
                        "adapter_version": answer.adapter_version})  # fmt: skip
            results.append(entities)
    if p.lines:
        return
    if p.as_json:
        return p.done({"adapter_id": args.adapter_id, "adapter_version": p.versions[0], "results": results})
    rows = []
    for i, entities in enumerate(results):
        for e in entities:
            start, end = ("-" if e[k] is None else str(e[k]) for k in ("start", "end"))
            rows.append(
                (str(i), e.get("entity_group", e.get("entity")), f"{e['score']:.4f}", start, end, e["word"])
            )
    header = ("INPUT", "LABEL", "SCORE", "START", "END", "WORD")
    p.done(_heading(args.adapter_id, p.versions) + "\n" + (table(header, rows) if rows else "no entities"))


def answer(args: argparse.Namespace, client: Client, p: Printer, stdin: TextIO) -> None:
    context = stdin.read() if args.context == "-" else args.context
    if not context.strip():
        raise InputError("the context is empty.")
    found = client.answer(args.adapter_id, args.question, context, top_k=args.top_k,
                          max_answer_len=args.max_answer_len,
                          handle_impossible_answer=args.handle_impossible_answer or None)  # fmt: skip
    if args.json:
        return p.done(found.raw)
    rows = [(str(rank), f"{a.score:.4f}", str(a.start), str(a.end), _clip(a.answer) or '""')
            for rank, a in enumerate(found.results[0], 1)]  # fmt: skip
    p.done(_heading(args.adapter_id, [found.adapter_version]) + "\n"
           + table(("RANK", "SCORE", "START", "END", "ANSWER"), rows))  # fmt: skip


def adapters(args: argparse.Namespace, client: Client, p: Printer) -> None:
    if args.action == "push":
        labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
        info = client.upload(args.adapter_id, args.directory, labels=labels)
        if args.json:
            return p.done({"created": info.created, **info.raw})
        verb = "created" if info.created else "replaced"
        what = f"{info.num_labels} labels ({', '.join(info.labels)})" if info.labels else "no labels"
        task = f"{info.task_type} adapter for {', '.join(info.routes)}: " if info.task_type else ""
        warned = "".join(f"\nwarning: {w}" for w in info.warnings)
        return p.done(f"{verb} {info.adapter_id} version {info.version}: {task}{what}, rank {info.rank}, "
                      f"{_size(info.size_bytes)}{warned}")  # fmt: skip
    if args.action == "ls":
        infos = client.list()
        if args.json:
            return p.done({"adapters": [a.raw for a in infos]})
        return p.done(adapters_table(infos) if infos else f"no adapters on {client.url}")
    if args.action == "show":
        info = client.get(args.adapter_id)
        return p.done(info.raw if args.json else adapters_table([info]))
    client.delete(args.adapter_id)
    p.done({"deleted": args.adapter_id} if args.json else f"deleted {args.adapter_id}")


TEXT_COMMANDS = {"classify": classify, "embed": embed, "rerank": rerank, "tokens": tokens}


def run(args: argparse.Namespace, client: Client, out: TextIO, stdin: TextIO) -> None:
    """Do the command, writing what it prints to `out`."""
    if args.command == "answer":
        return answer(args, client, Printer(out, args.json, lines=False), stdin)
    if args.command not in TEXT_COMMANDS:
        return adapters(args, client, Printer(out, args.json, lines=False))
    texts, from_input = read_texts(args, stdin)
    if not texts:
        raise InputError(f"{'stdin' if args.texts == ['-'] else args.texts[0]} holds no texts.")
    p = Printer(out, args.json, lines=args.json and (from_input or args.command == "embed"))
    TEXT_COMMANDS[args.command](args, client, texts, p)
    if len(p.versions) > 1:
        print(f"loraplex: warning: adapter {args.adapter_id} was replaced during the run; the results "
              f"come from versions {', '.join(p.versions)} in that order.", file=sys.stderr)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    client = Client(args.url, api_key=os.environ.get("LORAPLEX_API_KEY"),
                    admin_token=os.environ.get("LORAPLEX_ADMIN_TOKEN"), timeout=args.timeout)  # fmt: skip
    try:
        run(args, client, sys.stdout, sys.stdin)
    except (APIError, ChunkError) as e:
        error = e.error if isinstance(e, ChunkError) else e
        if args.json:
            print(
                json.dumps({"error": error.message, "error_type": error.error_type, "status": error.status})
            )
        where = f"HTTP {error.status} " if error.status is not None else ""
        chunk = ""
        if isinstance(e, ChunkError):
            chunk = (f"; in the request with inputs {e.start + 1}-{e.end} of {e.total} (the server counts "
                     "from 0 within a request)")  # fmt: skip
        print(f"loraplex: error: {error.message} ({where}{error.error_type}){chunk}", file=sys.stderr)
        return 1
    except (OSError, UnicodeDecodeError, InputError, csv.Error) as e:
        print(f"loraplex: error: {e}", file=sys.stderr)
        return 2
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
