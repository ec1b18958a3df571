"""
lbws: a WebSocket load balancer on Twisted and Autobahn.
"""

__version__ = "0.1.0"
