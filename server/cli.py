"""`loraplex` command line: `serve`, `train`, `adapters ...`, `classify ...`."""

from __future__ import annotations

import sys

USAGE = """usage: loraplex COMMAND [ARGS]

commands:
  serve       run the HTTP server
  train       fine-tune a LoRA classification adapter with PEFT
  adapters    push / ls / rm adapters on a running server
  classify    classify texts with an adapter on a running server
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from loraplex.serve import main as run
    elif command == "train":
        from loraplex.adapters.train import main as run
    elif command in ("adapters", "classify"):
        from loraplex.client_cli import main as run

        rest = argv
    else:
        print(f"loraplex: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
