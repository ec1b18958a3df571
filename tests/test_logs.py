"""
Logs for log shippers: `twistd lbws --log-format json` writes one JSON
object per line, and the access-log event of each client connection
carries its fields.
"""

import json

import pytest_twisted
from twisted.internet import reactor

from tests import support


@pytest_twisted.ensureDeferred
async def test_jsonAccessLog(tmp_path):
    factory, port = await support.startEchoBackend("a")
    config = tmp_path / "lbws.ini"
    config.write_text(support.configText([("a", factory.url)]))
    lbws = support.LbwsProcess(config, "--log-format", "json")
    try:
        client = await support.connect(lbws.url, path="/chat?room=1", protocols=["chat.v1"])
        client.sendMessage("héllo".encode())
        client.sendMessage(b"\x00\x01\x02", isBinary=True)
        for _ in range(2):
            await client.messages.get().addTimeout(5, reactor)
        client.sendClose(1000, "bye")
        await client.closed.addTimeout(5, reactor)
        await lbws.waitForLine(r'"log_format_access": true')
    finally:
        code = lbws.stop()
        await port.stopListening()
    assert code == 0

    events = []
    for line in lbws.lines:
        event = json.loads(line)
        assert isinstance(event, dict), line
        assert line.endswith("}\n"), line
        events.append(event)
    assert any(e.get("log_format", "").startswith("lbws listening on") for e in events)
    [access] = [e for e in events if e.get("log_format_access")]
    assert access["log_level"]["name"] == "info"
    assert access["duration"] > 0
    assert {
        key: access[key]
        for key in (
            "peer", "target", "backend", "subprotocol",
            "messagesIn", "bytesIn", "messagesOut", "bytesOut",
            "code", "reason", "side",
        )
    } == {
        "peer": "127.0.0.1",
        "target": "/chat?room=1",
        "backend": "a",
        "subprotocol": "chat.v1",
        "messagesIn": 2,
        "bytesIn": 9,
        "messagesOut": 2,
        "bytesOut": 9,
        "code": 1000,
        "reason": "bye",
        "side": "client",
    }
