"""
The twistd plugin: C{twistd lbws --config etc/lbws.ini}.
"""

from twisted.application.service import ServiceMaker

lbws = ServiceMaker(
    "lbws",
    "lbws.tap",
    "WebSocket load balancer with health checks and a live dashboard",
    "lbws",
)
