"""
lbws.backends.redirects: which backend URLs are rewritten to the client's
with host_header = backend (nginx's proxy_redirect default).
"""

import pytest

from lbws.backends.redirects import RedirectRewriter
from lbws.config import parseConfig


def backend(url):
    return parseConfig(f"[backend:a]\nurl = {url}\n", "t.ini").backends[0]


@pytest.mark.parametrize(
    "url, value, expected",
    [
        ("ws://10.0.0.5:8000/app", "http://10.0.0.5:8000/app/docs/", "https://pub.example/docs/"),
        ("ws://10.0.0.5:8000/app", "http://10.0.0.5:8000/app", "https://pub.example/"),
        ("ws://10.0.0.5:8000/app", "http://10.0.0.5:8000/app?x=1", "https://pub.example/?x=1"),
        ("ws://10.0.0.5:8000/app", "HTTP://10.0.0.5:8000/app/x", "https://pub.example/x"),
        ("ws://10.0.0.5:8000/app", "ws://10.0.0.5:8000/app/x", "https://pub.example/x"),
        # Not the prefix: /application is not under /app.
        ("ws://10.0.0.5:8000/app", "http://10.0.0.5:8000/application", "http://10.0.0.5:8000/application"),
        # Other hosts and ports, relative URLs: unchanged.
        ("ws://10.0.0.5:8000", "http://10.0.0.5:8001/x", "http://10.0.0.5:8001/x"),
        ("ws://10.0.0.5:8000", "http://other.example/x", "http://other.example/x"),
        ("ws://10.0.0.5:8000", "/relative", "/relative"),
        # The default port may be left out; IPv6 in brackets; wss as https.
        ("ws://app.internal", "http://app.internal/x", "https://pub.example/x"),
        ("ws://app.internal", "http://app.internal:80/x", "https://pub.example/x"),
        ("wss://app.internal", "https://app.internal/x", "https://pub.example/x"),
        ("wss://app.internal", "http://app.internal/x", "http://app.internal/x"),
        ("ws://[::1]:8000", "http://[::1]:8000/x", "https://pub.example/x"),
    ],
)
def test_location(url, value, expected):
    rewriter = RedirectRewriter(backend(url), "pub.example", secure=True)
    assert rewriter.rewrite("Location", value) == expected
    assert rewriter.rewrite("content-location", value) == expected
    assert rewriter.rewrite("Link", value) == value


def test_refresh():
    rewriter = RedirectRewriter(backend("ws://10.0.0.5:8000"), "pub.example:8443", secure=False)
    assert rewriter.rewrite("Refresh", "5; url=http://10.0.0.5:8000/next") == (
        "5; url=http://pub.example:8443/next"
    )
    assert rewriter.rewrite("Refresh", "0;URL='http://10.0.0.5:8000/'") == (
        "0;URL='http://pub.example:8443/'"
    )
    assert rewriter.rewrite("Refresh", "5") == "5"
