"""The worker's socket: a ZeroMQ ROUTER, plain or CurveZMQ with a running authenticator.

With keys (transport/security.py) the socket is a CURVE server and pyzmq's ZAP handler admits
only enrolled device keys; every message then carries the device's z85 public key as its
`User-Id`, which the worker uses as the device's identity. It fails closed: the authenticator is
checked to be running before the socket binds. Without keys, plain TCP is allowed on loopback
(tests, CI, `simulate`); a non-loopback address needs `insecure=True`, and the log says so.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

import zmq

from edgesplit.runtime.errors import ConfigError, EdgesplitError
from edgesplit.transport.security import Authenticator, ServerKeys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Message:
    """One ROUTER message: who sent it (routing id, and the CURVE user id when authenticated)."""

    routing_id: bytes
    parts: list[bytes]  # the frames after the routing id (the protocol wants exactly one)
    user_id: str | None


def is_loopback(bind: str) -> bool:
    """Whether a ZeroMQ endpoint only listens on this machine (ipc, inproc, tcp on a loopback address)."""
    if bind.startswith(("ipc://", "inproc://")):
        return True
    if not bind.startswith("tcp://"):
        return False
    host = bind[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a host name: may listen beyond this machine


def check_bind(bind: str, secure: bool, insecure: bool) -> None:
    """Refuse, before anything loads, an endpoint that is no ZeroMQ endpoint, or plain text beyond
    this machine without `insecure`."""
    if not bind.startswith(("tcp://", "ipc://", "inproc://")) or bind.endswith("://"):
        raise ConfigError(f"--bind {bind!r}: not a ZeroMQ endpoint; give e.g. tcp://127.0.0.1:5555")
    if not secure and not is_loopback(bind):
        if not insecure:
            raise ConfigError(f"--bind {bind}: plain text on a non-loopback address lets anyone who reaches the "
                              "port open sessions and read the traffic; give --keys DIR (CurveZMQ) or --insecure")
        log.warning("INSECURE: serving plain text on %s (no encryption, no device authentication)", bind)


class Listener:
    """A bound ROUTER socket (module docstring); `endpoint` is the address actually bound."""

    def __init__(self, bind: str, keys: ServerKeys | None = None, insecure: bool = False):
        check_bind(bind, keys is not None, insecure)
        self._ctx: zmq.Context = zmq.Context()  # own context: one ZAP handler per context, closed with it
        self.auth: Authenticator | None = None
        self.sock: zmq.Socket = self._ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)  # close() must not wait for unsent replies
        try:
            if keys is not None:
                self.auth = Authenticator(self._ctx, keys.devices)
                self.auth.check_running()
                self.sock.curve_secretkey = keys.secret
                self.sock.curve_publickey = keys.public
                self.sock.curve_server = True  # set before bind
            self.endpoint = self._bind(bind)
        except BaseException:
            self.close()
            raise

    def _bind(self, bind: str) -> str:
        base, _, port = bind.rpartition(":")
        try:
            if bind.startswith("tcp://") and port in ("0", "*"):
                return f"{base}:{self.sock.bind_to_random_port(base)}"
            self.sock.bind(bind)
        except zmq.ZMQError as exc:
            raise EdgesplitError(f"--bind {bind!r}: cannot bind the worker's socket there ({exc}); give a ZeroMQ "
                                 "endpoint such as tcp://127.0.0.1:5555") from None
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT) or bind

    def poll(self, timeout_ms: int) -> Message | None:
        """The next message, or None after `timeout_ms`."""
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return None
        frames = self.sock.recv_multipart(copy=False)
        user_id = None
        if self.auth is not None and len(frames) > 1:
            user_id = str(frames[1].get("User-Id"))  # set by the ZAP handler: the device's z85 public key
        return Message(frames[0].bytes, [f.bytes for f in frames[1:]], user_id)

    def send(self, routing_id: bytes, data: bytes) -> bool:
        """Send one reply; False when the peer is not reading (dropped rather than stall the rest)."""
        try:
            self.sock.send_multipart([routing_id, data], flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def enrolled(self, user_id: str | None) -> bool:
        """Whether the sender's key is (still) on the allow-list; always True in plain mode."""
        return self.auth is None or (user_id is not None and user_id.encode() in self.auth.allowed)

    def close(self) -> None:
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self._ctx.term()
