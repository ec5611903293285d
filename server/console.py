"""What every `loraplex` command shares: the version line and the help formatter.

A leaf: it imports nothing of loraplex, so the CLI, the server's settings and training all use it without
importing one another.
"""

from __future__ import annotations

import argparse


def version() -> str:
    """The installed distribution's version (what `pip show loraplex` says)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("loraplex")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def add_version(parser: argparse.ArgumentParser) -> None:
    """`--version` on a command's parser: prints `loraplex VERSION` and exits 0."""
    parser.add_argument(
        "--version",
        action="version",
        version=f"loraplex {version()}",
        help="show the installed version and exit",
    )


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, said once: "(default: X)" is added unless the help
    already names the default; an option without one says "(default: none)", a flag "(default: off)", and
    a required option "(required)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required and action.option_strings:
            return f"{text} (required)"
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default is None:
            return f"{text} (default: none)"
        if action.default is False and action.nargs == 0:
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"
