"""Helpers for the deployment tests: the repository's Dockerfile and nginx template, run on loopback."""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
NGINX_TEMPLATE = REPO / "deploy" / "nginx" / "loraplex.conf.template"

_SERVER_LINE = re.compile(
    r"^(?P<indent>[ \t]*)server\s+\$\{NGINX_UPSTREAM\}\s+resolve\s+(?P<params>[^;]*);", re.M
)


# --- Dockerfile --------------------------------------------------------------------------------------


def dockerfile_instructions(text: str | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text() if text is None else text
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, rest = full.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_stages(instructions: list[tuple[str, str]] | None = None) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (FROM included); the last stage is also under key ""."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, rest in instructions or dockerfile_instructions():
        if keyword == "FROM":
            parts = rest.split()
            name = parts[parts.index("AS") + 1] if "AS" in parts else f"stage{len(stages)}"
            current = stages.setdefault(name, [])
            stages[""] = current
        if current is not None:
            current.append((keyword, rest))
    return stages


def env_pairs(argument: str) -> dict[str, str]:
    """The variables an `ENV a=1 b="2"` instruction sets."""
    pairs = {}
    for word in shlex.split(argument):
        name, sep, value = word.partition("=")
        assert sep, f"ENV {argument!r}: use the NAME=value form"
        pairs[name] = value
    return pairs


def image_env(variant: str = "cpu") -> dict[str, str]:
    """The environment the runtime stage of docker/Dockerfile gives the server (build args substituted)."""
    env: dict[str, str] = {}
    for keyword, rest in dockerfile_stages()[""]:
        if keyword == "ENV":
            for name, value in env_pairs(rest).items():
                env[name] = value.replace("${VARIANT}", variant).replace("$PATH", os.environ.get("PATH", ""))
    return env


# --- nginx -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_nginx_template(upstream_ports: list[int], listen_port: int, template: str | None = None) -> str:
    """The repository's nginx template as the nginx image would render it, with loopback replicas.

    The variables get loopback values, and the one upstream `server` line becomes one line per replica
    (same parameters, without `resolve`: loopback addresses need no DNS). Nothing else changes.
    """
    text = NGINX_TEMPLATE.read_text() if template is None else template
    match = _SERVER_LINE.search(text)
    assert match, "the template has no `server ${NGINX_UPSTREAM} resolve ...;` line"
    servers = "\n".join(
        f"{match['indent']}server 127.0.0.1:{port} {match['params'].strip()};" for port in upstream_ports
    )
    text = text[: match.start()] + servers + text[match.end() :]
    values = {"NGINX_LISTEN": f"127.0.0.1:{listen_port}", "NGINX_RESOLVER": "127.0.0.1"}
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    left = re.findall(r"\$\{[A-Z_]+\}", text)
    assert not left, f"unrendered template variables: {left}"
    return text


class Nginx:
    """The distribution's nginx, as the current user, with everything under a temporary prefix."""

    def __init__(self, site_config: str, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.prefix = Path(tempfile.mkdtemp(prefix="loraplex-nginx-"))
        self.site_config = site_config
        self.proc: subprocess.Popen | None = None

    def _main_config(self) -> str:
        p = self.prefix
        user = ""
        if os.geteuid() == 0:  # workers would otherwise switch to `nobody` and lose the temp directories
            user = f"user {pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name};"
        return f"""
{user}
worker_processes 1;
daemon off;
pid {p}/nginx.pid;
error_log {p}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {p}/access.log;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    include {p}/site.conf;
}}
"""

    def start(self) -> Nginx:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise RuntimeError("nginx is not installed (.ci/run installs the nginx-light package)")
        (self.prefix / "site.conf").write_text(self.site_config)
        (self.prefix / "nginx.conf").write_text(self._main_config())
        args = [
            binary,
            "-p",
            str(self.prefix),
            "-c",
            str(self.prefix / "nginx.conf"),
            "-e",
            str(self.prefix / "error.log"),
        ]
        check = subprocess.run([*args, "-t"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx rejected the configuration:\n{check.stderr}\n{self.site_config}")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.error_log()}")
            try:
                if httpx.get(self.url + "/nginx-health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not answer:\n{self.error_log()}")

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.prefix, ignore_errors=True)

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- loraplex ----------------------------------------------------------------------------------------


def upload(client: httpx.Client, url: str, adapter_id: str, adapter_dir: Path, token: str | None = None):
    """PUT /adapters/{id} with a PEFT adapter directory (labels from its labels.json)."""
    files = {
        "adapter_config": ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes()),
        "adapter_model": (
            "adapter_model.safetensors",
            (adapter_dir / "adapter_model.safetensors").read_bytes(),
        ),
    }
    data = {"labels": json.dumps(json.loads((adapter_dir / "labels.json").read_text()))}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.put(f"{url}/adapters/{adapter_id}", files=files, data=data, headers=headers)
