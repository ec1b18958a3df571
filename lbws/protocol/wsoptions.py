"""
The Autobahn protocol options every WebSocket of lbws shares, client side
and backend side alike: lbws relays frames itself and keeps its own
timers, so Autobahn's timers, size limits, UTF-8 checks and pings are off.

  - No open or close handshake timeout, no auto ping: lbws times these on
    its injected reactor (Autobahn's go through txaio's batched timer,
    which rounds deadlines down to whole seconds).
  - C{failByDrop} off: a failed connection gets its close frame.
  - No UTF-8 validation, no frame or message size limit: the tunnel
    passes frames unchanged and enforces C{max_message_size} itself.
"""

PASSTHROUGH = dict(
    openHandshakeTimeout=0,
    closeHandshakeTimeout=0,
    autoPingInterval=0,
    failByDrop=False,
    utf8validateIncoming=False,
    maxFramePayloadSize=0,
    maxMessagePayloadSize=0,
    tcpNoDelay=True,
)
