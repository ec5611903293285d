"""README's "Ten minutes with loraplex", command by command, against a live server.

The commands are read from the section's ```sh blocks, so the test fails when the README drifts from what
the CLI does. Two steps are done differently, and checked for their form only: `pip install` (this
environment is installed already) and `loraplex serve` (started through LiveServer with the README's own
options, on a free port and a temporary store; the CLI finds it through $LORAPLEX_URL). Every other command
runs as a `python -m loraplex` subprocess in a scratch directory where `adapters/` is the repository's, and
what it prints is checked against what that step says it does. The section's ```python blocks (the OpenAI
SDK's step) run after the commands, against the same server, and must print what follows them ("→ ...").
The server and the commands run with one OpenMP thread each: on a machine whose cores are shared, torch's
thread pools otherwise spin against each other and the training step takes several times as long.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraplex.client_cli import parse_args as client_args
from loraplex.train.trainer import parse_args as train_args
from tests.live_server import REPO, LiveServer

SECTION = "## Ten minutes with loraplex"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def walkthrough_commands(readme: str) -> list[list[str]]:
    """The shell commands of the section's ```sh blocks, split into words, in order."""
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    section = readme[start : end if end != -1 else len(readme)]
    blocks = re.findall(r"^```sh\n(.*?)^```", section, flags=re.S | re.M)
    return [
        shlex.split(line, comments=True) for block in blocks for line in block.splitlines() if line.strip()
    ]


def walkthrough_programs(readme: str) -> list[tuple[str, list[str]]]:
    """The section's ```python blocks, each with the lines it says it prints (`→ ...`, then `...`)."""
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    section = readme[start : end if end != -1 else len(readme)]
    found = re.findall(r"^```python\n(.*?)^```\n\n→ (.*?)\n\n", section, flags=re.S | re.M)
    return [(code, re.findall(r"`([^`]*)`", printed)) for code, printed in found]


def rows_of(out: str) -> list[dict[str, str]]:
    """A printed table (after its `adapter ... version ...` heading) as dicts keyed by its header."""
    lines = out.splitlines()
    assert lines and lines[0].startswith("adapter "), out
    header = lines[1].split()
    cells = [re.split(r"\s{2,}", line.strip(), maxsplit=len(header) - 1) for line in lines[2:]]
    return [dict(zip(header, row, strict=True)) for row in cells]


def cli(words: list[str], cwd: Path, url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **ONE_THREAD, "LORAPLEX_URL": url, "PYTHONUNBUFFERED": "1"}
    env.pop("LORAPLEX_API_KEY", None)
    env.pop("LORAPLEX_ADMIN_TOKEN", None)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", *words], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    print(f"{time.monotonic() - started:5.1f} s  {shlex.join(words)}")  # shown when the test fails
    assert done.returncode == 0, f"{shlex.join(words)} exited {done.returncode}:\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return done


def versions_in(out: str) -> set[str]:
    """The adapter versions a classify printed: its table heading, its JSON, or its JSON lines."""
    heading = re.match(r"adapter \S+ version (\S+)\n", out)
    if heading:
        return {heading.group(1)}
    try:
        return {json.loads(out)["adapter_version"]}
    except ValueError:
        return {json.loads(line)["adapter_version"] for line in out.splitlines()}


def test_the_readme_walkthrough(tmp_path):
    commands = walkthrough_commands((REPO / "README.md").read_text())
    installs = [c for c in commands if c[:2] == ["pip", "install"]]
    serves = [c for c in commands if c[:2] == ["loraplex", "serve"]]
    assert installs and len(serves) == 1 and commands.index(serves[0]) == len(installs), commands
    assert all(c[0] == "loraplex" for c in commands[len(installs) :]), "only loraplex commands after install"
    assert any("-e" in c and any(w.endswith("[train]") for w in c) for c in installs), installs
    preloaded = {arg.split("=", 1)[0] for arg in serves[0] if "=" in arg}

    work = tmp_path / "clone"
    work.mkdir()
    (work / "adapters").symlink_to(REPO / "adapters")  # the clone's bundled demo adapters and example CSV
    store = tmp_path / "store"
    steps: list[str] = []
    started = time.monotonic()
    with LiveServer(*serves[0][2:], "--adapter-store", str(store), env=ONE_THREAD) as srv:
        print(f"{time.monotonic() - started:5.1f} s  server ready")
        present, versions = set(preloaded), {}
        for words in commands[len(installs) + 1 :]:
            out = cli(words, work, srv.url).stdout
            if words[1] == "train":
                output = work / train_args(words[2:]).output
                assert (output / "adapter_config.json").is_file() and (output / "labels.json").is_file()
                steps.append("train")
                continue
            args = client_args(words[1:])
            verb = args.action if args.command == "adapters" else args.command
            if verb == "push":
                created = args.adapter_id not in present
                match = re.match(rf"(created|replaced) {re.escape(args.adapter_id)} version (\S+):", out)
                assert match and match.group(1) == ("created" if created else "replaced"), out
                assert match.group(2) != versions.get(args.adapter_id)
                versions[args.adapter_id] = match.group(2)
                present.add(args.adapter_id)
                steps.append("push" if created else "replace")
            elif verb == "classify":
                assert args.adapter_id in present
                if args.adapter_id in versions:  # pushed in the walkthrough: the version last pushed answers
                    assert versions_in(out) == {versions[args.adapter_id]}, out
                if len(args.texts) == 1 and (work / args.texts[0]).is_file():
                    with open(work / args.texts[0], newline="") as f:
                        rows = sum(1 for _ in csv.DictReader(f))
                    assert args.json and len(out.splitlines()) == rows > 32, "one JSON line per row"
                    steps.append("classify a file")
                steps.append("classify")
            elif verb == "tokens":
                rows = rows_of(out)
                assert {"HASHTAG", "MENTION"} <= {r["LABEL"] for r in rows}, out
                for r in rows:  # each entity is its span of the text
                    text = args.texts[int(r["INPUT"])]
                    assert text[int(r["START"]) : int(r["END"])].lower() == r["WORD"].replace(" ", ""), out
                steps.append("tokens")
            elif verb == "answer":
                best = rows_of(out)[0]
                assert best["ANSWER"] == "#driverless" == args.context[int(best["START"]) : int(best["END"])]
                steps.append("answer")
            elif verb == "rerank":
                ranked = [int(r["INDEX"]) for r in rows_of(out)]
                assert sorted(ranked) == list(range(len(args.texts))), out
                assert "coachella" in args.texts[ranked[0]].lower(), out
                steps.append("rerank")
            elif verb == "embed":
                rows = rows_of(out)
                assert [(r["DIMS"], r["NORM"]) for r in rows] == [("384", "1.0000")] * len(args.texts), out
                steps.append("embed")
            elif verb == "show":
                assert versions.get(args.adapter_id, "") in out
            elif verb == "rm":
                assert out.strip() == f"deleted {args.adapter_id}"
                present.discard(args.adapter_id)
                steps.append("rm")
            else:
                assert verb == "ls", f"a walkthrough step this test does not check: {shlex.join(words)}"
                listed = {line.split()[0] for line in out.splitlines()[1:]}
                assert listed == present, out
        for code, printed in walkthrough_programs((REPO / "README.md").read_text()):
            assert "http://127.0.0.1:8000" in code, code
            env = {**os.environ, **ONE_THREAD}
            env.pop("OPENAI_BASE_URL", None)
            run = subprocess.run([sys.executable, "-c", code.replace("http://127.0.0.1:8000", srv.url)],
                                 cwd=work, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
            assert run.returncode == 0, run.stderr
            assert run.stdout.splitlines() == printed, run.stdout
            steps.append("sdk" if "from openai import" in code else "python")
    for step in ("train", "push", "classify", "classify a file", "replace", "rm"):
        assert step in steps, f"the walkthrough no longer shows: {step}"
    for step in ("tokens", "answer", "rerank", "embed", "sdk"):
        assert step in steps, f"the walkthrough no longer shows: {step}"
    assert steps.index("train") < steps.index("push") < steps.index("replace") < steps.index("rm")


def test_the_walkthrough_is_near_the_top():
    readme = (REPO / "README.md").read_text()
    headings = re.findall(r"^## .*$", readme, flags=re.M)
    assert SECTION in headings[:3], headings
    if not walkthrough_commands(readme):
        pytest.fail("the walkthrough has no ```sh blocks")
