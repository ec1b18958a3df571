"""
A FastAPI application as its documentation sets one up, served by uvicorn:
a page, a WebSocket route, a route whose path ends with a slash (so that
the same path without it is answered by Starlette's redirect_slashes with
307 and an absolute Location built from Host), and TrustedHostMiddleware
accepting only the host names given with --allow (400 for any other Host).

Usage: python tests/apps/fastapi_app.py --allow HOST [--allow HOST ...]
Listens on 127.0.0.1, a free port, printed as "listening PORT".
"""

import argparse
import socket

import uvicorn
from fastapi import FastAPI, WebSocket
from fastapi.responses import HTMLResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware


def makeApp(allowed):
    app = FastAPI()
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return "<!doctype html><title>app</title><p>the page</p>"

    @app.get("/guide/")
    async def guide():
        return {"guide": True}

    @app.websocket("/ws")
    async def echo(websocket: WebSocket):
        await websocket.accept()
        while True:
            text = await websocket.receive_text()
            await websocket.send_json({"echo": text, "host": websocket.headers.get("host")})

    return app


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--allow", action="append", required=True)
    args = parser.parse_args()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(f"listening {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(makeApp(args.allow), log_level="warning", lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
