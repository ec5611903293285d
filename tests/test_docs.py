"""/docs and /redoc work offline: their pages load only this server's assets, and a real browser renders
every route from /openapi.json."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from urllib.parse import urljoin, urlparse

import httpx
import pytest

from loraplex.http.routes.docs import ASSET_PREFIX, ASSETS
from tests.contract_support import contract_server


@pytest.fixture(scope="module")
def srv():
    return contract_server()


class _References(HTMLParser):
    """Every URL a page makes the browser fetch: script src, link href, img src."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href"):
            if attrs.get(name) and tag in ("script", "link", "img"):
                self.urls.append(attrs[name])


def _page_urls(html: str) -> list[str]:
    parser = _References()
    parser.feed(html)
    # Swagger UI's page also names its spec and assets inside its inline script.
    inline = re.findall(r"""(?:url|src|href)\s*[:=]\s*['"]([^'"]+)['"]""", html)
    return parser.urls + inline


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_doc_pages_reference_only_local_assets_and_the_assets_are_served(srv, page):
    response = httpx.get(srv.url + page, timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    urls = _page_urls(response.text)
    assert any(u.endswith(".js") for u in urls), urls
    for url in urls:
        absolute = urljoin(srv.url + page, url)
        assert urlparse(absolute).netloc == urlparse(srv.url).netloc, f"{page} loads {url} from elsewhere"
        asset = httpx.get(absolute, timeout=30)
        assert asset.status_code == 200, url
        assert asset.content, url
        if ASSET_PREFIX in url:
            assert asset.headers["content-type"].startswith(ASSETS[url.rsplit("/", 1)[-1]]), url


def test_unknown_assets_are_a_404_in_the_error_shape(srv):
    for name in ("nope.js", "..%2Fsettings.py", "%2e%2e%2fapp.py"):
        response = httpx.get(f"{srv.url}{ASSET_PREFIX}/{name}", timeout=10)
        assert response.status_code == 404, name
        assert set(response.json()) == {"error", "error_type"}


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _rendered(url: str) -> str:
    """The DOM of `url` after its scripts ran, from headless Chromium."""
    with tempfile.TemporaryDirectory(prefix="loraplex-chromium-") as profile:
        result = subprocess.run(
            [
                _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=30000",
                # No name resolves but loopback: the page must render as it would offline.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--dump-dom", url,
            ],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


needs_chromium = pytest.mark.skipif(
    _chromium() is None, reason="Chromium is not installed (Debian: apt-get install chromium)"
)


def _operations(doc: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item}


@needs_chromium
def test_swagger_ui_renders_every_route_in_a_browser(srv):
    doc = httpx.get(srv.url + "/openapi.json", timeout=10).json()
    dom = _rendered(srv.url + "/docs")
    # Each operation is a block: its method badge, then its path.
    shown = re.findall(
        r'class="opblock-summary-method">([A-Z]+)</span>.*?data-path="([^"]+)"', dom, flags=re.DOTALL
    )
    assert _operations(doc) <= set(shown), _operations(doc) - set(shown)


@needs_chromium
def test_redoc_renders_every_route_in_a_browser(srv):
    doc = httpx.get(srv.url + "/openapi.json", timeout=10).json()
    dom = _rendered(srv.url + "/redoc")
    # Each operation's panel shows its verb, then its path.
    shown = re.findall(r'class="[^"]*http-verb ([a-z]+)">[a-z]+</span><span[^>]*>([^<]+)</span>', dom)
    operations = {(method.lower(), path) for method, path in _operations(doc)}
    assert operations <= set(shown), operations - set(shown)
