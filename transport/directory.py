"""The worker directory of a pool: which replicas are live, and which one serves a session.

A pool of cloud workers (cloud/pool.py) publishes its live replicas on a small ZeroMQ REP socket:
the request is the msgpack map `{"v": 1, "op": "list"}`, the reply `{"v": 1, "replicas": [...]}`
with one map per live replica (`name`, `endpoint`, `pid`, `node`, `store`), or `{"v": 1, "error":
MESSAGE}` for a request it does not understand (and it goes on serving).

Devices choose a replica by rendezvous hashing (highest random weight) of the session id over the
replica names: every device computes the same order without coordination, a session's replica
changes only when that replica leaves, and the rest of the order is where the session moves on
failure. Names, not endpoints, are hashed, so a replica restarted on another port keeps its
sessions' new traffic. The directory carries no secrets: with CurveZMQ the device checks the
worker's key, so a forged list can only point at workers that cannot prove the key.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import msgpack
import zmq

from edgesplit.runtime.errors import EdgesplitError

log = logging.getLogger(__name__)

DIRECTORY_VERSION = 1
POLL_MS = 100  # the server's stop check interval


class DirectoryError(EdgesplitError):
    """The directory did not answer, answered garbage, or lists no live replica."""


@dataclass(frozen=True)
class Replica:
    """One live worker of a pool: a stable name, where it listens now, and what it serves."""

    name: str  # stable across restarts ("replica-0")
    endpoint: str  # its ZeroMQ endpoint now (a restart may change the port or node)
    pid: int  # the worker's process id on its node
    node: str  # the node's address
    store: str  # the store fingerprint (ModelIdentity.fingerprint) it serves

    @classmethod
    def from_dict(cls, d: object) -> "Replica":
        if not isinstance(d, dict) or set(d) != {"name", "endpoint", "pid", "node", "store"}:
            raise DirectoryError(f"directory: a replica must be a map of name, endpoint, pid, node, store; got {d!r:.200}")
        if not all(isinstance(d[k], str) for k in ("name", "endpoint", "node", "store")) or not isinstance(d["pid"], int):
            raise DirectoryError(f"directory: replica fields have the wrong types: {d!r:.200}")
        return cls(**d)


def _weight(session: str, name: str) -> bytes:
    return hashlib.blake2b(f"{session}\0{name}".encode(), digest_size=8).digest()


def rank(session: str, replicas: Sequence[Replica]) -> tuple[Replica, ...]:
    """`replicas` in the session's order: its own replica first, then where it moves on failure."""
    return tuple(sorted(replicas, key=lambda r: _weight(session, r.name), reverse=True))


def query(endpoint: str, timeout_s: float = 2.0, context: zmq.Context | None = None) -> tuple[Replica, ...]:
    """The live replicas the directory at `endpoint` lists (DirectoryError if it does not answer
    within `timeout_s`, answers garbage, or lists none)."""
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(msgpack.packb({"v": DIRECTORY_VERSION, "op": "list"}))
        if not sock.poll(int(timeout_s * 1000)):
            raise DirectoryError(f"the worker directory at {endpoint} did not answer within {timeout_s:g} s")
        reply = msgpack.unpackb(sock.recv(), raw=False)
    except (ValueError, msgpack.ExtraData, zmq.ZMQError) as exc:
        raise DirectoryError(f"the worker directory at {endpoint}: {exc}") from exc
    finally:
        sock.close()
    if not isinstance(reply, dict) or reply.get("v") != DIRECTORY_VERSION:
        raise DirectoryError(f"the worker directory at {endpoint} answered an unknown format: {reply!r:.200}")
    if "error" in reply:
        raise DirectoryError(f"the worker directory at {endpoint} refused the query: {reply['error']}")
    replicas = tuple(Replica.from_dict(r) for r in reply.get("replicas") or ())
    if not replicas:
        raise DirectoryError(f"the worker directory at {endpoint} lists no live replica")
    return replicas


def routes(directory: str, timeout_s: float = 2.0) -> Callable[[str], tuple[str, ...]]:
    """A session's endpoints in failover order, asked of the directory afresh at each call."""
    def endpoints_for(session: str) -> tuple[str, ...]:
        return tuple(r.endpoint for r in rank(session, query(directory, timeout_s)))
    return endpoints_for


class DirectoryServer:
    """Answers directory queries on `bind` (REP) from a thread, with `live()`'s replicas at the time."""

    def __init__(self, bind: str, live: Callable[[], Sequence[Replica]]):
        self.live = live
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.bind(bind)
        except zmq.ZMQError as exc:
            self._ctx.destroy(linger=0)
            raise DirectoryError(f"cannot bind the worker directory on {bind!r}: {exc}") from exc
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="edgesplit-directory", daemon=True)
        self._thread.start()

    def _answer(self, data: bytes) -> dict:
        try:
            req = msgpack.unpackb(data, raw=False)
        except (ValueError, msgpack.ExtraData) as exc:
            return {"v": DIRECTORY_VERSION, "error": f"not msgpack: {exc}"}
        if req != {"v": DIRECTORY_VERSION, "op": "list"}:
            return {"v": DIRECTORY_VERSION, "error": f"expected {{'v': {DIRECTORY_VERSION}, 'op': 'list'}}, "
                                                     f"got {req!r:.200}"}
        return {"v": DIRECTORY_VERSION, "replicas": [asdict(r) for r in self.live()]}

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(POLL_MS):
                self._sock.send(msgpack.packb(self._answer(self._sock.recv())))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._ctx.destroy(linger=0)
