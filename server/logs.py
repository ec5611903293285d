"""How every process of the server logs: one handler on the root logger, as text or as JSON lines.

Text: `2026-12-05 07:40:01,123 INFO loraplex.access: POST /classify adapter=sent status=200 rows=2 ms=8.1`.
JSON (`--log-format json`): one object a line with `time`, `level`, `logger`, `message` and the record's
own fields (the access log's `method`, `route`, `adapter`, `status`, `rows`, `ms`), for log shippers.
"""

from __future__ import annotations

import json
import logging
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What logging.LogRecord has of its own; anything else on a record was passed as `extra`.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        moment = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry = {
            "time": f"{moment}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry |= {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True, default=str)


def configure(level: str, fmt: str = "text") -> None:
    """Root logging for this process at `level` ("info", ...), as `fmt` ("text" or "json")."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
