"""The client's own distribution (`pip install ./server/client`): loraplex.client, needing only httpx."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_client_wheel_holds_the_client_alone_and_needs_only_httpx(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         str(REPO / "server" / "client"), "-w", str(tmp_path)],
        check=True, timeout=600,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("loraplex_client-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        z.extractall(tmp_path / "site")
    assert [n for n in names if ".dist-info/" not in n] == ["loraplex/client/__init__.py"]
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert requires == ["Requires-Dist: httpx>=0.27"]
    # The wheel's module, loaded by itself, brings in neither torch nor the server.
    module = tmp_path / "site" / "loraplex" / "client" / "__init__.py"
    check = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('client_alone', {str(module)!r})\n"
        "m = sys.modules['client_alone'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(m)\n"
        "assert m.Client and m.AsyncClient\n"
        "heavy = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'transformers', 'fastapi'))\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
