"""schemathesis against a live server: every request it builds from /openapi.json, valid or not, gets the
answer the document promises. All phases (examples, coverage, fuzzing, stateful), all checks, a fixed seed.

The store is empty, so every adapter id is unknown: a body that passes the schema but fails the server's own
field checks is a 422 before the lookup's 404, and shows as a mismatch between document and server. The one
exception is an upload: whether a file is safetensors whose tensors fit its config, a schema cannot say.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.live_server import LiveServer

SEED = 20261202
MAX_EXAMPLES = 60  # per operation and phase; about a minute here
CONFIG = """
[[operations]]
include-name = "PUT /adapters/{adapter_id}"
# 415: not safetensors; 422: tensors that do not fit the config or labels (the operation's description).
checks.positive_data_acceptance.expected-statuses = [200, 201, 401, 403, 409, 413, 415, 422, 429]
# 413: a part over its documented maxLength is refused as too large.
checks.negative_data_rejection.expected-statuses = [400, 401, 403, 409, 413, 415, 422, 429]
"""


@pytest.fixture(scope="module")
def srv():
    store = tempfile.mkdtemp(prefix="loraplex-fuzz-store-")
    with LiveServer("--adapter-store", store) as server:
        yield server


@pytest.mark.timeout(900)
def test_schemathesis_finds_no_failure(srv, tmp_path: Path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
        f"{srv.url}/openapi.json", "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful",
        "--seed", str(SEED), "--max-examples", str(MAX_EXAMPLES), "--workers", "1", "--no-color",
        "--generation-database", "none", "--request-timeout", "120",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=840)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-20000:]
    assert " passed" in report and "failed" not in report, report[-20000:]
    # Every operation of the document was exercised.
    selected, total = re.search(r"Selected: (\d+)/(\d+)", report).groups()
    tested = re.search(r"Tested: (\d+)", report).group(1)
    assert tested == selected == total, report[-5000:]
