"""
systemd's service notification protocol (sd_notify(3)), spoken directly.

Under C{Type=notify} systemd passes the address of a Unix datagram socket in
C{NOTIFY_SOCKET}: a path, or an abstract name written with a leading C{@}.
The service sends newline-separated C{KEY=VALUE} lines to it: lbws sends
C{READY=1} once it listens, C{RELOADING=1} and then C{READY=1} around a
reload, and C{STOPPING=1} when it starts to stop. Without C{NOTIFY_SOCKET}
there is no notifier and nothing is sent.
"""

import socket
import time

from twisted.logger import Logger

_log = Logger()


class Notifier:
    """
    Sends notifications to one C{NOTIFY_SOCKET} address.
    """

    def __init__(self, address):
        """
        @param address: the C{NOTIFY_SOCKET} value: an absolute path, or
            C{@name} for a socket in the abstract namespace.
        """
        self.address = address
        if address.startswith("@"):
            self._target = "\0" + address[1:]
        else:
            self._target = address

    def notify(self, *fields):
        """
        Send one notification made of C{fields} such as C{"READY=1"}.

        A failure is logged, never raised: systemd not listening must not
        stop lbws.

        @return: True if the datagram was sent.
        """
        message = "\n".join(fields).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.setblocking(False)
                s.sendto(message, self._target)
        except OSError as e:
            _log.warn(
                "cannot notify systemd at {address}: {why}",
                address=self.address,
                why=e.strerror or str(e),
                fields=fields,
            )
            return False
        return True

    def ready(self, status=None, mainPid=None):
        """
        READY=1; with C{mainPid}, this process (one that took over, see
        L{lbws.ops.handoff}) is the service's main process from now on.
        """
        main = () if mainPid is None else (f"MAINPID={mainPid}",)
        return self.notify(*main, "READY=1", *_status(status))

    def reloading(self):
        # MONOTONIC_USEC lets systemd >= 253 match this to the reload it asked
        # for; older versions ignore it. It is CLOCK_MONOTONIC by definition,
        # not the reactor's clock.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self):
        return self.notify("STOPPING=1")

    def status(self, status):
        return self.notify(*_status(status))


def _status(status):
    if status is None:
        return ()
    # One line: a newline would start another field.
    return ("STATUS=" + " ".join(str(status).split()),)


def fromEnvironment(environ):
    """
    The notifier systemd asked for through C{NOTIFY_SOCKET}, or None when
    lbws does not run under C{Type=notify} (or the address is of a kind
    lbws does not speak, which is logged).
    """
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return None
    if not (address.startswith("/") or address.startswith("@")):
        _log.warn(
            "NOTIFY_SOCKET={address} is not a Unix socket path or @name:"
            " not notifying systemd",
            address=address,
        )
        return None
    return Notifier(address)
