"""
An aiohttp application serving a page (GET /), a REST route (POST
/api/items) and a WebSocket (/ws) on one port, for lbws's common-stacks
tests and the README's recipe.

Usage: python tests/aiohttp_app.py [--port N] [--name NAME]; prints
"listening PORT" once it accepts connections.
"""

import argparse
import asyncio
import json

from aiohttp import WSMsgType, web

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>aiohttp</title></head>
<body><pre id="result">connecting</pre>
<script>
  const out = document.getElementById('result');
  const ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws');
  ws.onmessage = (event) => { out.textContent = event.data; };
  ws.onopen = () => ws.send('from the browser');
</script></body></html>
"""


def app(name):
    async def page(request):
        return web.Response(text=PAGE, content_type="text/html")

    async def items(request):
        item = await request.json()
        return web.json_response(
            {"backend": name, "item": item, "forwarded_for": request.headers.get("X-Forwarded-For")},
            status=201,
        )

    async def socket(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(json.dumps({"backend": name, "echo": message.data}))
        return ws

    application = web.Application()
    application.router.add_get("/", page)
    application.router.add_post("/api/items", items)
    application.router.add_get("/ws", socket)
    return application


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="aiohttp")
    options = parser.parse_args()
    runner = web.AppRunner(app(options.name))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", options.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
