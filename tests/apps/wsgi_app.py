"""
A WSGI application for lbws's plain-HTTP tests under gunicorn (a server
nobody here wrote): a page with an ETag (304 on If-None-Match) and Range
support, 204, a gzip-encoded body, and an upload that answers the length
and SHA-256 of what it read.
"""

import gzip
import hashlib

PAGE = bytes(range(256)) * 64
ETAG = '"page-1"'


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/empty":
        start_response("204 No Content", [])
        return [b""]
    if path == "/gz":
        body = gzip.compress(PAGE)
        start_response(
            "200 OK",
            [("Content-Encoding", "gzip"), ("Content-Length", str(len(body))), ("Vary", "Accept-Encoding")],
        )
        return [body]
    if path == "/upload":
        body = environ["wsgi.input"].read()
        answer = f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
        start_response("200 OK", [("Content-Length", str(len(answer)))])
        return [answer]
    if environ.get("HTTP_IF_NONE_MATCH") == ETAG:
        start_response("304 Not Modified", [("ETag", ETAG)])
        return [b""]
    headers = [("ETag", ETAG), ("Accept-Ranges", "bytes")]
    ranged = environ.get("HTTP_RANGE", "")
    if ranged.startswith("bytes="):
        first, _, last = ranged[6:].partition("-")
        part = PAGE[int(first) : int(last) + 1]
        headers += [
            ("Content-Range", f"bytes {first}-{int(first) + len(part) - 1}/{len(PAGE)}"),
            ("Content-Length", str(len(part))),
        ]
        start_response("206 Partial Content", headers)
        return [part]
    start_response("200 OK", headers + [("Content-Length", str(len(PAGE)))])
    return [PAGE]
