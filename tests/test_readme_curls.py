"""Every `curl -s localhost:8000/...` request of README, run as printed (the real curl, only the port
changed) against a live server started with the quick start's own `loraplex serve` options, so the demo
adapters it preloads are those the examples name; each answer must be the JSON printed after it.

In a printed answer `…` stands for any value (`"…"` a string, `[…]` a whole list, `, …]` more items);
numbers printed with two decimals match within 0.01; every other value, and every key, as printed. A
request followed by `→ a, b, c.` instead must answer those labels, in order."""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.live_server import REPO, LiveServer

ANY, MORE = "\u0000any", "\u0000more"
QUICK_START = "## Quick start"


def readme() -> str:
    return (REPO / "README.md").read_text()


def quick_start_serve(text: str) -> list[str]:
    """The options of the quick start's `loraplex serve` (its first command, after `&&`)."""
    start = text.index(QUICK_START)
    section = text[start : text.index("\n## ", start + 1)]
    line = next(line for line in section.splitlines() if "loraplex serve" in line)
    words = shlex.split(line.split("&&")[-1])
    assert words[:2] == ["loraplex", "serve"], line
    return words[2:]


def examples(text: str) -> list[tuple[str, str, str]]:
    """(curl command, what follows it: a ```json block or a `→` line, its kind) for every curl."""
    found = []
    pattern = r"^ {4}(curl -s localhost:8000/.*?)(?<!\\)\n\n(```json\n(.*?)\n```|→ (.*?)\n)"
    for match in re.finditer(pattern, text, flags=re.S | re.M):
        command = re.sub(r"\\\n\s*", " ", match.group(1))
        if match.group(3) is not None:
            found.append((command, match.group(3), "json"))
        else:
            found.append((command, match.group(4), "labels"))
    return found


def printed(text: str):
    """A printed answer as JSON, with ANY and MORE where it shows `…`."""
    text = text.replace('"…"', json.dumps(ANY)).replace("[…]", json.dumps(ANY))
    text = re.sub(r",\s*…\s*\]", lambda _: f", {json.dumps(MORE)}]", text)
    return json.loads(text.replace("…", json.dumps(ANY)))


def mismatch(want, got, where: str = "$") -> str | None:
    """Where `got` differs from the printed `want`; None when it is as printed."""
    if want == ANY:
        return None
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(want) != set(got):
            return f"{where}: keys {sorted(got) if isinstance(got, dict) else got!r}, printed {sorted(want)}"
        return next((m for k in want if (m := mismatch(want[k], got[k], f"{where}.{k}"))), None)
    if isinstance(want, list):
        more = bool(want) and want[-1] == MORE
        items = want[:-1] if more else want
        if not isinstance(got, list) or len(got) < len(items) or (not more and len(got) != len(items)):
            return f"{where}: {got!r}, printed {len(items)} items{' or more' if more else ''}"
        return next((m for i, w in enumerate(items) if (m := mismatch(w, got[i], f"{where}[{i}]"))), None)
    if isinstance(want, float) and not isinstance(got, bool) and isinstance(got, int | float):
        return None if abs(want - got) <= 0.01 else f"{where}: {got}, printed {want}"
    return None if want == got and type(want) is type(got) else f"{where}: {got!r}, printed {want!r}"


def named_adapter(command: str) -> str | None:
    """The adapter a README request names: `adapter_id` in its body, else its X-Adapter-Id header."""
    words = shlex.split(command)
    body = json.loads(words[words.index("-d") + 1]) if "-d" in words else {}
    headers = [words[i + 1] for i, word in enumerate(words) if word == "-H"]
    routed = [h.split(":", 1)[1].strip() for h in headers if h.lower().startswith("x-adapter-id:")]
    return body.get("adapter_id") or next(iter(routed), None)


def test_the_readme_has_a_request_for_every_route_and_demo_adapter():
    text = readme()
    commands = [command for command, _, _ in examples(text)]
    routes = {command: re.search(r"localhost:8000(/\S+)", command).group(1) for command in commands}
    needing = {"/classify", "/tokens", "/answer", "/rerank", "/predict"}  # an adapter; /embed: or the base
    assert needing | {"/embed", "/tokenize", "/info", "/v1/models"} <= set(routes.values()), routes
    preloaded = {arg.split("=", 1)[0] for arg in quick_start_serve(text) if "=" in arg}
    demos = {path.name for path in (REPO / "adapters" / "demo").iterdir() if path.is_dir()}
    assert preloaded == demos, (preloaded, demos)  # the quick start serves every demo adapter
    named = {command: named_adapter(command) for command in routes}
    assert all(named[command] for command, route in routes.items() if route in needing), named
    assert set(named.values()) - {None} <= preloaded, named  # no example names an adapter nothing provides


def test_matching_is_strict():
    """The matcher catches what a wrong README shows: another label, a missing key, another count."""
    want = printed('{"a": "…", "b": [{"label": "x", "score": 0.5}, …], "c": […]}')
    assert mismatch(want, {"a": "v", "b": [{"label": "x", "score": 0.504}, {}], "c": [1, 2]}) is None
    assert mismatch(want, {"a": "v", "b": [{"label": "y", "score": 0.5}], "c": []})
    assert mismatch(want, {"a": "v", "b": [{"label": "x", "score": 0.6}], "c": []})
    assert mismatch(want, {"a": "v", "b": [], "c": []})
    assert mismatch(want, {"a": "v", "b": [{"label": "x", "score": 0.5}]})
    assert mismatch(printed("[1, 2]"), [1, 2, 3])


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    with LiveServer(*quick_start_serve(readme()), "--adapter-store", str(store)) as server:
        yield server


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary")
@pytest.mark.parametrize("number", range(len(examples(readme()))))
def test_every_readme_request_answers_as_printed(number, srv):
    command, expected, kind = examples(readme())[number]
    words = [w.replace("localhost:8000", srv.url.removeprefix("http://")) for w in shlex.split(command)]
    done = subprocess.run(
        [*words, "--max-time", "300"], capture_output=True, text=True, timeout=400, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    if kind == "labels":
        labels = [label.strip() for label in expected.rstrip(".").split(",")]
        assert [r["label"] for r in got["results"]] == labels, (command, got)
    else:
        problem = mismatch(printed(expected), got)
        assert problem is None, f"{command}\n{problem}\nanswered: {json.dumps(got)[:2000]}"


def test_the_readme_openai_example_runs_as_printed(srv):
    """README's OpenAI SDK block (its client section), with its defaults, against the quick start's server."""
    pytest.importorskip("openai")
    pattern = r"^```python\n(from openai import OpenAI\n.*?)^```"
    text = readme()
    section = text[text.index("## OpenAI and TEI clients") :]
    block = re.search(pattern, section, flags=re.S | re.M).group(1)
    code = block.replace("http://127.0.0.1:8000", srv.url)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    models, sizes = done.stdout.splitlines()
    preloaded = {arg.split("=", 1)[0] for arg in quick_start_serve(readme()) if "=" in arg}
    listed = set(ast.literal_eval(models))
    assert preloaded < listed and len(listed - preloaded) == 1, listed  # every adapter and the base model
    assert sizes == "384 384"
