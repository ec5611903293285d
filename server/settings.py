"""Server settings: one class, read from `--option-name` flags, `LORAPLEX_<OPTION>` variables and defaults.

Precedence: command-line flag, then environment variable, then default. Every field is an option:
`max_batch_tokens` is `--max-batch-tokens` and `LORAPLEX_MAX_BATCH_TOKENS`.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import re
import socket
from argparse import SUPPRESS
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from loraplex.console import add_version

ENV_PREFIX = "LORAPLEX_"
_DEVICE_RE = re.compile(r"^(cpu|cuda(:[0-9]+)?)$")
_PRELOAD_RE = re.compile(r"^([^=]+)=(.+)$")
_SECRETS = ("api_key", "admin_token", "metrics_token")
MIN_TOKEN_CHARS = 32
# Words of the placeholders that example files and manifests carry; a random token never spells them.
_PLACEHOLDER_RE = re.compile(r"replace|change[-_ ]?(me|this|it)|placeholder|example|your[-_ ]", re.IGNORECASE)
MAKE_A_TOKEN = (
    "make one with `openssl rand -hex 32` or `python -c 'import secrets; print(secrets.token_hex(32))'`"
)
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    model: str | None = Field(None, description="base model directory (unset: the embedded all-MiniLM-L6-v2)")
    device: str | None = Field(None, description="cpu, cuda or cuda:N (unset: cuda when available)")
    dtype: Literal["auto", "float32", "float16", "bfloat16", "int8"] = Field(
        "auto",
        description="engine precision (auto: bfloat16 on cuda, float32 on cpu): float32; bfloat16 or int8 on "
        "cpu; float16, bfloat16 on cuda",
    )
    adapter_store: str = Field(
        "./adapter-store", description="shared adapter store: a directory or s3://bucket/prefix"
    )
    workers: int | None = Field(
        None,
        ge=1,
        le=64,
        description="HTTP worker processes around the one engine process (default: 1 on cpu; on cuda half "
        "the cores, at most 8)",
    )
    engine_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="CPU threads of the engine process's matmuls (default: torch's own, every core; a "
        "pass too small to split runs on one)",
    )
    max_resident: int = Field(16, ge=1, description="engine slots: adapters resident for one forward pass")
    max_host_cache: int = Field(256, ge=1, description="adapters kept parsed in host memory")
    max_rank: int = Field(64, ge=1, le=1024, description="largest LoRA rank an adapter may have")
    max_labels: int = Field(32, ge=1, description="largest number of labels an adapter head may have")
    max_batch_tokens: int = Field(
        16384, ge=1, description="token budget of one forward pass, counted as padded length x rows"
    )
    max_batch_size: int = Field(64, ge=1, description="most rows in one forward pass")
    max_wait_ms: float = Field(
        2.0, ge=0, le=10_000, description="how long an idle engine waits for a batch to fill"
    )
    max_queued: int = Field(1024, ge=1, description="inputs waiting for the engine; beyond it: 429")
    max_client_batch: int = Field(32, ge=1, description="most inputs in one request (/answer: windows)")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1, description="largest /classify request body")
    max_upload_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1,
        description="largest adapter upload body, and largest stored or preloaded file",
    )
    max_concurrent_uploads: int = Field(
        16, ge=1, description="adapter uploads one HTTP worker takes at once; beyond it: 429 with Retry-After"
    )
    request_timeout_s: float = Field(30.0, gt=0, description="a /classify request not done by then: 503")
    staleness_s: float = Field(
        2.0, ge=0, description="how stale this replica's view of the shared store may be"
    )
    drain_grace_s: float = Field(
        30.0, ge=0, description="after SIGTERM, how long accepted requests may take before exit"
    )
    api_key: SecretStr | None = Field(None, description="bearer token for /classify and GET /adapters")
    admin_token: SecretStr | None = Field(None, description="bearer token for PUT and DELETE /adapters")
    api_key_file: Path | None = Field(
        None,
        description="file holding the API key, read when api_key is unset (absent: refuse to start)",
    )
    admin_token_file: Path | None = Field(
        None,
        description="file holding the admin token, read at start when admin_token is unset (absent: none)",
    )
    allow_unauthenticated_writes: bool = Field(
        False,
        description="accept adapter writes without an admin token on a non-loopback host (anyone can write)",
    )
    allow_anonymous_inference: bool = Field(
        False,
        description="start with no API key on a non-loopback host: inference and adapter reads open to all",
    )
    metrics_token: SecretStr | None = Field(
        None, description="bearer token for /metrics (unset: /metrics is open)"
    )
    metrics_token_file: Path | None = Field(
        None, description="file holding the metrics token, read when metrics_token is unset (absent: none)"
    )
    metrics_adapter_labels: Literal["auto", "on", "off"] = Field(
        "auto",
        description="adapter ids as metrics labels (auto: on when /metrics needs a token or on loopback)",
    )
    preload: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="ID=DIR: import the PEFT adapter in DIR as ID at start (repeatable; env: comma list)",
    )
    metrics_max_adapters: int = Field(
        64, ge=0, description="adapters with their own metrics label; the rest count under 'other'"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="logging")
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text, or as one JSON object a line (for log shippers)"
    )
    replica_id: str = Field(
        default_factory=lambda: socket.gethostname()[:128] or "loraplex",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$",
        description="this replica's name in the X-Loraplex-Replica response header (default: host name)",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        if value in (None, "", "auto"):
            return None
        if not _DEVICE_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a device; use cpu, cuda or cuda:N")
        return value

    @field_validator("api_key", "admin_token", "metrics_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("api_key_file", "admin_token_file", "metrics_token_file", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _tokens_from_files(self) -> Settings:
        for name in _SECRETS:
            path = getattr(self, f"{name}_file")
            if getattr(self, name) is not None or path is None:
                continue
            if not path.exists():
                if name == "api_key":  # an absent key would leave inference open: refuse, never fail open
                    raise ValueError(
                        f"api_key_file {path} does not exist, so inference would be open to anyone. "
                        f"Put an API key there ({MAKE_A_TOKEN}), set LORAPLEX_API_KEY, "
                        "or set LORAPLEX_API_KEY_FILE= (empty) to run without one"
                    )
                # No admin token turns writes off (see auth); no metrics token leaves /metrics open.
                continue
            try:
                token = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"{name}_file {path} cannot be read ({type(exc).__name__})") from None
            if not token:
                raise ValueError(
                    f"{name}_file {path} is empty; put a token in it ({MAKE_A_TOKEN}) or unset {name}_file"
                )
            object.__setattr__(self, name, SecretStr(token))  # frozen model: set once, while validating
        for name in _SECRETS:
            secret = getattr(self, name)
            if secret is not None:
                problem = token_problem(secret.get_secret_value())
                if problem and not self.loopback_only:
                    raise ValueError(f"{name} {problem}; {MAKE_A_TOKEN}")
                if problem:  # only this machine can reach the server: said, not refused
                    logging.getLogger("loraplex.settings").warning(
                        "%s %s; fine on 127.0.0.1, refused on any other address (%s)",
                        name,
                        problem,
                        MAKE_A_TOKEN,
                    )
        return self

    @model_validator(mode="after")
    def _inference_closed_or_opened_on_purpose(self) -> Settings:
        if self.api_key is None and not self.loopback_only and not self.allow_anonymous_inference:
            raise ValueError(
                f"this server would listen on {self.host} with no API key, so anyone who reaches it "
                "could run inference and list adapters. Set LORAPLEX_API_KEY or LORAPLEX_API_KEY_FILE "
                f"({MAKE_A_TOKEN}), "
                "listen on 127.0.0.1, or start with --allow-anonymous-inference "
                "(LORAPLEX_ALLOW_ANONYMOUS_INFERENCE=true) to open inference on purpose"
            )
        return self

    @property
    def anonymous_inference(self) -> bool:
        """Whether inference and adapter reads need no token."""
        return self.api_key is None

    @property
    def metrics_adapter_limit(self) -> int:
        """Adapters that get their own metrics label: none when adapter ids would be shown to anyone."""
        if self.metrics_adapter_labels == "off":
            return 0
        if self.metrics_adapter_labels == "auto" and self.metrics_token is None and not self.loopback_only:
            return 0
        return self.metrics_max_adapters

    @property
    def loopback_only(self) -> bool:
        """Whether `host` is a loopback address: only this machine can reach the server."""
        if self.host.lower() in _LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower_log_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("preload", mode="before")
    @classmethod
    def _split_preload(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("preload")
    @classmethod
    def _check_preload(cls, items: list[str]) -> list[str]:
        for item in items:
            match = _PRELOAD_RE.fullmatch(item)
            if not match:
                raise ValueError(f"{item!r} is not ID=DIR")
            if not Path(match.group(2)).is_dir():
                raise ValueError(f"{item!r}: {match.group(2)} is not a directory")
        return items

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_client_batch > self.max_queued:
            raise ValueError(
                f"max_client_batch ({self.max_client_batch}) is larger than max_queued ({self.max_queued}), "
                "so a full client batch could never be admitted"
            )
        if self.max_host_cache < self.max_resident:
            raise ValueError(
                f"max_host_cache ({self.max_host_cache}) is smaller than max_resident "
                f"({self.max_resident}), so resident adapters would be read from the store again on every "
                "request; raise --max-host-cache or lower --max-resident"
            )
        return self

    def preload_items(self) -> list[tuple[str, Path]]:
        """`preload` as (adapter_id, directory) pairs."""
        return [(m.group(1), Path(m.group(2))) for m in map(_PRELOAD_RE.fullmatch, self.preload) if m]

    def body_limit(self, path: str) -> int:
        """Largest request body accepted on `path`: uploads get their own, larger limit."""
        return self.max_upload_bytes if path.startswith("/adapters") else self.max_body_bytes


def token_problem(token: str) -> str | None:
    """Why `token` is not fit to guard a server (too short, a known placeholder), or None."""
    if len(token) < MIN_TOKEN_CHARS:
        return f"is {len(token)} characters long; a token needs at least {MIN_TOKEN_CHARS}"
    if _PLACEHOLDER_RE.search(token) or len(set(token)) < 8:
        return "is a placeholder, not a random token"
    return None


class SettingsError(Exception):
    """A bad option value; the message names the option, its flag and its variable."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; we report and return 2
        raise SettingsError(message)


def option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(prog: str = "loraplex serve") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Run the loraplex HTTP server.", argument_default=SUPPRESS)
    add_version(parser)
    for name, field in Settings.model_fields.items():
        default = field.default if field.default_factory is None else field.default_factory()
        shown = (
            "unset" if default in (None, []) or name in _SECRETS else "off" if default is False else default
        )
        # A description that names its own default (one computed at start) is not given a second one.
        said = "" if "default" in (field.description or "") else f"; default: {shown}"
        help_text = f"{field.description} (env {ENV_PREFIX}{name.upper()}{said})"
        if name == "preload":
            parser.add_argument(option_flag(name), action="append", metavar="ID=DIR", help=help_text)
        elif field.annotation is bool:
            parser.add_argument(option_flag(name), action="store_const", const=True, help=help_text)
        else:
            parser.add_argument(option_flag(name), metavar=name.upper(), help=help_text)
    return parser


def load_settings(argv: list[str]) -> Settings:
    """Settings from flags in `argv`, then the environment, then defaults; raises SettingsError."""
    args = vars(build_parser().parse_args(argv))
    try:
        return Settings(**args)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        loc = [str(part) for part in err["loc"] if not isinstance(part, int)]
        message = err["msg"].removeprefix("Value error, ")
        if loc and loc[0] in Settings.model_fields:
            name = loc[0]
            got = "" if name in _SECRETS else f" (got {err['input']!r})"
            lines.append(f"{option_flag(name)} / {ENV_PREFIX}{name.upper()}: {message}{got}")
        else:
            lines.append(message)
    return "invalid settings:\n  " + "\n  ".join(lines)
