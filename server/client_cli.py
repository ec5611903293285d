"""`loraplex adapters push|ls|show|rm` and `loraplex classify`: the Python client from the shell.

    loraplex adapters push tweet-sentiment adapters/demo/tweet-sentiment
    loraplex adapters ls
    loraplex classify tweet-sentiment "what a lovely day" "my flight got cancelled"
    loraplex adapters rm tweet-sentiment

The server is `--url`, else $LORAPLEX_URL, else http://127.0.0.1:8000. Tokens come from the server's own
variables: $LORAPLEX_API_KEY (classify, ls, show) and $LORAPLEX_ADMIN_TOKEN (push, rm). Output is a table
for people, or the server's JSON with `--json`. Exit codes: 0 done, 1 the server refused or could not be
reached, 2 a usage error or unreadable local files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from loraplex.client import DEFAULT_URL, AdapterInfo, APIError, Classification, Client


def parse_args(argv: list[str]) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("LORAPLEX_URL") or DEFAULT_URL,
                        help="server address (default: $LORAPLEX_URL or %(default)s)")  # fmt: skip
    common.add_argument("--json", action="store_true", help="print the server's JSON instead of a table")
    common.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: 60)")

    parser = argparse.ArgumentParser(prog="loraplex", description="Manage adapters on a loraplex server.")
    commands = parser.add_subparsers(dest="command", required=True)
    adapters = commands.add_parser("adapters", help="push, list, show or remove adapters")
    actions = adapters.add_subparsers(dest="action", required=True)
    push = actions.add_parser(
        "push", parents=[common], help="upload a PEFT adapter directory (create or replace)"
    )
    push.add_argument("adapter_id", metavar="ID")
    push.add_argument("directory", metavar="DIR", help="holds adapter_config.json, adapter_model.safetensors")
    push.add_argument("--labels", help="comma-separated label names in head order (default: DIR/labels.json)")
    actions.add_parser("ls", parents=[common], help="list the adapters")
    show = actions.add_parser("show", parents=[common], help="show one adapter")
    show.add_argument("adapter_id", metavar="ID")
    rm = actions.add_parser("rm", parents=[common], help="delete an adapter")
    rm.add_argument("adapter_id", metavar="ID")

    classify = commands.add_parser("classify", parents=[common], help="classify texts with an adapter")
    classify.add_argument("adapter_id", metavar="ID")
    classify.add_argument(
        "texts", metavar="TEXT", nargs="+", help="texts to classify; - reads one per line from stdin"
    )
    classify.add_argument("--raw-scores", action="store_true", help="logits instead of probabilities")
    classify.add_argument(
        "--no-truncate",
        dest="truncate",
        action="store_false",
        help="refuse texts longer than the model maximum instead of cutting them",
    )
    return parser.parse_args(argv)


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
    header = ("ID", "VERSION", "LABELS", "RANK", "TARGETS", "SIZE", "RESIDENT", "CREATED")
    rows = [
        (a.adapter_id, a.version, ",".join(a.labels), "-" if a.rank is None else str(a.rank),
         ",".join(a.target_modules) or "-", _size(a.size_bytes), _yes_no(a.resident), a.created_at or "-")
        for a in infos
    ]  # fmt: skip
    return table(header, rows)


def _clip(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def classification_table(answer: Classification, texts: list[str], raw_scores: bool) -> str:
    labels = list(answer.results[0].scores) if answer.results else []
    fmt = "{:.4f}" if not raw_scores else "{:+.3f}"
    header = ("LABEL", "SCORE", *(lab.upper() for lab in labels), "TEXT")
    rows = [
        (r.label, fmt.format(r.score), *(fmt.format(r.scores[lab]) for lab in labels), _clip(text))
        for r, text in zip(answer.results, texts, strict=True)
    ]
    return f"adapter {answer.adapter_id} version {answer.adapter_version}\n" + table(header, rows)


def _read_texts(texts: list[str]) -> list[str]:
    if texts == ["-"]:
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    return texts


def run(args: argparse.Namespace, client: Client) -> str | dict | list:
    """Do the command; returns what to print (a table, or JSON data with --json)."""
    if args.command == "classify":
        texts = _read_texts(args.texts)
        answer = client.classify(args.adapter_id, texts, truncate=args.truncate, raw_scores=args.raw_scores)
        return answer.raw if args.json else classification_table(answer, texts, args.raw_scores)
    if args.action == "push":
        labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
        info = client.upload(args.adapter_id, args.directory, labels=labels)
        if args.json:
            return {"created": info.created, **info.raw}
        verb = "created" if info.created else "replaced"
        return (f"{verb} {info.adapter_id} version {info.version}: {info.num_labels} labels "
                f"({', '.join(info.labels)}), rank {info.rank}, {_size(info.size_bytes)}")  # fmt: skip
    if args.action == "ls":
        infos = client.list()
        if args.json:
            return {"adapters": [a.raw for a in infos]}
        return adapters_table(infos) if infos else f"no adapters on {client.url}"
    if args.action == "show":
        info = client.get(args.adapter_id)
        return info.raw if args.json else adapters_table([info])
    client.delete(args.adapter_id)
    return {"deleted": args.adapter_id} if args.json else f"deleted {args.adapter_id}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    client = Client(args.url, api_key=os.environ.get("LORAPLEX_API_KEY"),
                    admin_token=os.environ.get("LORAPLEX_ADMIN_TOKEN"), timeout=args.timeout)  # fmt: skip
    try:
        out = run(args, client)
    except APIError as e:
        if args.json:
            print(json.dumps({"error": e.message, "error_type": e.error_type, "status": e.status}))
        where = f"HTTP {e.status} " if e.status is not None else ""
        print(f"loraplex: error: {e.message} ({where}{e.error_type})", file=sys.stderr)
        return 1
    except (OSError, UnicodeDecodeError) as e:
        print(f"loraplex: error: {e}", file=sys.stderr)
        return 2
    finally:
        client.close()
    print(json.dumps(out, indent=2, ensure_ascii=False) if args.json else out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
