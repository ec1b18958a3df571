"""
What route matching costs per new connection: the matcher of
lbws/backends/routes.py timed with a table of ROUTES routes (hosts, wildcards,
paths and subprotocols), for requests that match early, late and not at
all, and for the implicit route of a configuration without routes.

    .venv/bin/python bench/routes.py [--routes 20] [--number 200000]

Matching happens once per WebSocket handshake (and once per plain HTTP
request), never per message.
"""

import argparse
import sys
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lbws.config import parseConfig  # noqa: E402
from lbws.backends.routes import RouteTable  # noqa: E402


def configText(count):
    """
    A configuration of C{count} routes over four backends: a quarter each
    with an exact host, a wildcard host, a path only, and a path with a
    subprotocol.
    """
    text = "".join(f"[backend:b{i}]\nurl = ws://127.0.0.1:{9000 + i}\n" for i in range(4))
    for i in range(count):
        kind = i % 4
        text += f"[route:r{i}]\nbackends = b{i % 4}\n"
        if kind == 0:
            text += f"host = app{i}.example.com\npath = /app{i}\n"
        elif kind == 1:
            text += f"host = *.tenant{i}.example.com\n"
        elif kind == 2:
            text += f"path = /service{i}/v1\n"
        else:
            text += f"path = /service{i}\nsubprotocol = proto{i}\n"
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--routes", type=int, default=20)
    parser.add_argument("--number", type=int, default=200_000)
    options = parser.parse_args()
    table = RouteTable.of(parseConfig(configText(options.routes), "bench.ini"))
    implicit = RouteTable.of(parseConfig(configText(0), "bench.ini"))
    last = options.routes - 1
    cases = [
        ("exact host, first in order", table, "app0.example.com:8020", "/app0/room", ()),
        ("wildcard host", table, "x.tenant1.example.com", "/", ()),
        ("path with subprotocol", table, "www.example.com", f"/service{last}/x", (f"proto{last}",)),
        ("no route (404), every test", table, "www.example.com", "/nothing/here", ("chat",)),
        ("implicit route (no [route:])", implicit, "www.example.com", "/chat/room", ()),
    ]
    print(f"{options.routes} routes, {options.number} matches per case")
    for label, routes, host, path, offered in cases:
        matched = routes.match(host, path, offered)
        seconds = min(
            timeit.repeat(
                lambda: routes.match(host, path, offered), number=options.number, repeat=3
            )
        )
        name = matched.name if matched is not None else "none"
        print(f"  {label:32} -> {name:8} {seconds / options.number * 1e6:6.2f} us per match")


if __name__ == "__main__":
    main()
