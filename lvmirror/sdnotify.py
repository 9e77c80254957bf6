"""systemd's sd_notify protocol (READY=1, STATUS=..., STOPPING=1), without libsystemd.

The service manager passes a datagram socket in $NOTIFY_SOCKET; a path starting with '@' is in the
abstract namespace. Outside systemd the variable is unset and every call is a no-op.
"""

import os
import socket


def notify(*assignments: str) -> bool:
    """Send 'KEY=value' lines to the service manager; returns True when a manager was told."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    message = "\n".join(assignments).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message, address)
        except OSError:
            return False
    return True
