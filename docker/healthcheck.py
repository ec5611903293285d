"""Container health probe: exit 0 when `GET /health` on this container's loraplex answers 200, else 1.

`healthcheck.py /ready` probes readiness instead (model loaded and warm, not draining). Standard library
only, so that it needs nothing beyond the image's Python. It reads the port the server was told to use
(LORAPLEX_PORT) and always asks the loopback interface, whatever LORAPLEX_HOST is.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    path = argv[0] if argv else "/health"
    if path not in ("/health", "/ready"):
        print(f"usage: healthcheck.py [/health | /ready], not {path!r}", file=sys.stderr)
        return 2
    port = os.environ.get("LORAPLEX_PORT", "8000")
    url = f"http://127.0.0.1:{port}{path}"
    try:
        # urlopen raises HTTPError (a URLError) for any 4xx/5xx answer
        with urllib.request.urlopen(url, timeout=3.0) as reply:
            status = reply.status
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
