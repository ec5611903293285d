"""`loraplex` command line: `serve`, `train`, `adapters ...`, `classify ...`."""

from __future__ import annotations

import sys

from loraplex.console import version

USAGE = """usage: loraplex COMMAND [ARGS]

commands:
  serve       run the HTTP server
  train       fine-tune a LoRA adapter of any task (--task) with PEFT
  adapters    push / ls / show / rm adapters on a running server
  classify    classify texts (arguments, stdin, or a text, CSV or JSONL file) with an adapter
  embed       embed texts with a FEATURE_EXTRACTION adapter or the base model
  rerank      order texts by relevance to a query with a cross-encoder adapter
  tokens      find entities in texts with a token-classification adapter
  answer      answer a question from a context with a question-answering adapter

options:
  -h, --help  show this help and exit
  --version   show the installed version and exit

`loraplex COMMAND --help` shows a command's options, each with its default; every command takes --version.
"""


CLIENT_COMMANDS = ("adapters", "classify", "embed", "rerank", "tokens", "answer")  # loraplex.client_cli's


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"loraplex {version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from loraplex.serve import main as run
    elif command == "train":
        from loraplex.train.trainer import main as run
    elif command in CLIENT_COMMANDS:
        from loraplex.client_cli import main as run

        rest = argv
    else:
        print(f"loraplex: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
