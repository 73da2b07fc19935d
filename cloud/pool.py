"""A pool of cloud workers as Ray actors, with a directory devices query (`edgesplit cloud pool`).

Ray does the distributed part: it places one actor per replica (CPU/GPU per replica, in a
placement group spread over the nodes), restarts an actor whose process dies, and reports who is
alive. Each actor runs a whole `CloudWorker` (its engine, its KV slot pool, its own ZeroMQ
endpoint) in a thread, so devices talk to replicas directly over ZeroMQ, never through Ray.
edgesplit does the rest: the driver polls the actors, keeps the list of live replicas, and serves
it on the directory socket (transport/directory.py); devices hash each session id onto that list
and move a lost session to the next replica in its order by replaying it (device/remote.py). A
session's KV cache lives on exactly one replica: a request never falls back silently to a replica
without it (a replica that does not know a session answers `unknown_session`, and the device
replays). Ray Serve's session affinity is best-effort, which is why actors are used directly.

Needs the optional extra `[cluster]` (ray); only the CLI imports this module.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import asdict, dataclass
from typing import Any

import ray
import ray.exceptions
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from edgesplit.runtime.errors import ConfigError, EdgesplitError
from edgesplit.runtime.models import resolve_store
from edgesplit.runtime.plan import ModelIdentity, Plan
from edgesplit.runtime.store import ModelStore
from edgesplit.transport.directory import DirectoryServer, Replica
from edgesplit.transport.security import ServerKeys

from .listener import check_bind
from .worker import CloudWorker

log = logging.getLogger(__name__)

WATCH_S = 0.5  # how often the driver asks every replica whether it is alive
ASK_S = 2.0  # a replica that does not answer within this is left out of the directory


class PoolError(EdgesplitError):
    """The pool cannot start or run as asked (the cause and the values are in the message)."""


@dataclass(frozen=True)
class WorkerLimits:
    """The `CloudWorker` limits every replica runs with (cloud serve's flags)."""

    max_sessions: int = 16
    max_sessions_per_device: int = 4
    max_kv_mb: float | None = None
    max_kv_mb_per_device: float | None = None
    idle_timeout_s: float = 60.0


@dataclass(frozen=True)
class PoolSettings:
    """What `edgesplit cloud pool` starts: N replicas of `model`, where, and with which keys."""

    model: str
    replicas: int
    address: str | None = None  # an existing Ray cluster ("auto", "HOST:PORT"); None: start a local one
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    threads: int = 1  # onnxruntime threads per replica
    host: str = "127.0.0.1"  # the address each replica binds (a node's own address on a real cluster)
    base_port: int = 0  # replica i binds base_port + i (a restart comes back on the same port); 0: free ports
    directory: str = "tcp://127.0.0.1:5590"  # where the directory answers devices
    keys: str | None = None  # CurveZMQ keys folder (edgesplit keys init-cloud), present on every node
    insecure: bool = False
    limits: WorkerLimits = WorkerLimits()
    warm_plans: tuple[Plan, ...] = ()  # back segments every replica builds (and runs once) at start
    place_timeout_s: float = 20.0  # waiting for Ray to place the replicas
    start_timeout_s: float = 300.0  # waiting for the replicas to load the model (a first run converts it)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be >= 1, got {self.replicas}")
        if not self.cpus_per_replica > 0 or self.gpus_per_replica < 0:
            raise ConfigError(f"--cpus-per-replica must be > 0 and --gpus-per-replica >= 0, got "
                              f"{self.cpus_per_replica} and {self.gpus_per_replica}")
        if self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if not 0 <= self.base_port <= 65535 - self.replicas:
            raise ConfigError(f"--base-port must leave room for {self.replicas} ports, got {self.base_port}")
        check_bind(self.bind_for(0), self.keys is not None, self.insecure)

    def bind_for(self, index: int) -> str:
        return f"tcp://{self.host}:{self.base_port + index if self.base_port else 0}"


def store_identity(store: ModelStore) -> ModelIdentity:
    """What replicas must agree on: the fingerprint of every shard of the store."""
    return ModelIdentity.of_store(store, store.precisions + store.head_precisions)


class ReplicaWorker:
    """One replica (a Ray actor): a CloudWorker serving from a thread of the actor's process."""

    def __init__(self, name: str, model: str, bind: str, keys: str | None, insecure: bool, threads: int,
                 limits: WorkerLimits, warm_plans: tuple[Plan, ...]):
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(name)s %(levelname)s %(message)s")
        store = ModelStore(resolve_store(model, progress=False))
        self.worker = CloudWorker(store, bind=bind, threads=threads, keys=None if keys is None else ServerKeys.load(keys),
                                  insecure=insecure, warm_plans=warm_plans, **asdict(limits))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.worker.serve_forever, args=(self.stop,), name="edgesplit-worker",
                                       daemon=True)
        self.thread.start()
        node = ray.util.get_node_ip_address()
        self.replica = Replica(name, self.worker.endpoint, os.getpid(), node, store_identity(store).fingerprint)

    def describe(self) -> dict:
        """This replica's directory entry (raises if its worker thread has died)."""
        if not self.thread.is_alive():
            raise PoolError(f"{self.replica.name}: its worker thread has stopped")
        return asdict(self.replica)

    def shutdown(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.worker.close()


def check_replicas(replicas: list[Replica], fingerprint: str) -> None:
    """Every replica must serve the store the pool was started for (PoolError naming the first that does not)."""
    for r in replicas:
        if r.store != fingerprint:
            raise PoolError(f"{r.name} (pid {r.pid} on {r.node}) serves a model store with fingerprint "
                            f"{r.store[:16]}..., not the pool's {fingerprint[:16]}...: its node has another "
                            "store under that name; convert the same GGUF there")


def _check_answers(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT Ray address must accept a TCP connection (ray.init would retry it for minutes)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray resolves them itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise PoolError(f"no Ray cluster answers at --address {address!r} (TCP connect within {timeout_s:g} s: "
                        f"{exc})") from exc


def _connect(address: str | None) -> None:
    if address is not None:
        _check_answers(address)
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
                 configure_logging=False)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
        raise PoolError(f"no Ray cluster answers at --address {address!r}: {exc}") from exc


def _place(s: PoolSettings) -> Any:
    """A placement group with one bundle per replica (spread over nodes), or PoolError if Ray
    cannot place it (the resources asked and those the cluster has are named)."""
    bundle = {"CPU": s.cpus_per_replica, **({"GPU": s.gpus_per_replica} if s.gpus_per_replica else {})}
    total = ray.cluster_resources()
    asked = {k: v * s.replicas for k, v in bundle.items()}
    short = {k: (v, total.get(k, 0.0)) for k, v in asked.items() if total.get(k, 0.0) < v}
    if short:
        raise PoolError(f"cannot place {s.replicas} replica(s) of {bundle}: the cluster has "
                        + ", ".join(f"{have:g} {k} for {want:g} asked" for k, (want, have) in short.items()))
    pg = placement_group([bundle] * s.replicas, strategy="SPREAD")
    try:
        ray.get(pg.ready(), timeout=s.place_timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        remove_placement_group(pg)
        raise PoolError(f"Ray did not place {s.replicas} replica(s) of {bundle} within {s.place_timeout_s:g} s "
                        f"(available: {ray.available_resources()})") from exc
    return pg


class Pool:
    """N replicas on Ray and the directory that lists the live ones; `close()` stops everything."""

    def __init__(self, settings: PoolSettings):
        self.settings = s = settings
        store = ModelStore(resolve_store(s.model, progress=True))  # the reference the replicas must match
        self.fingerprint = store_identity(store).fingerprint
        self.live: dict[str, Replica] = {}
        self._lock = threading.Lock()
        self.directory: DirectoryServer | None = None
        self.actors: dict[str, Any] = {}
        self.pg: Any = None
        _connect(s.address)
        try:
            self.pg = _place(s)
            self._start_actors(str(store.path) if s.address is None else s.model)
            self.directory = DirectoryServer(s.directory, self.replicas)
        except BaseException:
            self.close()
            raise

    def _start_actors(self, model: str) -> None:
        s = self.settings
        actor = ray.remote(ReplicaWorker)
        for i in range(s.replicas):
            name = f"replica-{i}"
            self.actors[name] = actor.options(  # Ray restarts a replica whose process dies, forever
                max_restarts=-1, max_task_retries=0, num_cpus=s.cpus_per_replica, num_gpus=s.gpus_per_replica,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(name, model, s.bind_for(i), s.keys, s.insecure, s.threads, s.limits,
                      s.warm_plans)
        try:
            infos = ray.get([a.describe.remote() for a in self.actors.values()], timeout=s.start_timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise PoolError(f"the replicas did not start within {s.start_timeout_s:g} s") from exc
        except ray.exceptions.RayError as exc:
            raise PoolError(f"a replica failed to start: {exc}") from exc
        replicas = [Replica(**d) for d in infos]
        check_replicas(replicas, self.fingerprint)
        self.live = {r.name: r for r in replicas}

    def replicas(self) -> list[Replica]:
        """The live replicas, by name."""
        with self._lock:
            return [self.live[k] for k in sorted(self.live)]

    def watch_once(self) -> list[str]:
        """Ask every replica whether it lives; update the directory; returns what changed (log lines)."""
        refs = {name: a.describe.remote() for name, a in self.actors.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=ASK_S)
        changes, now = [], {}
        for name, ref in refs.items():
            if ref not in ready:
                continue
            try:
                r = Replica(**ray.get(ref))
            except ray.exceptions.RayError as exc:
                log.debug("%s is not answering: %s", name, exc)
                continue
            try:
                check_replicas([r], self.fingerprint)
            except PoolError as exc:
                log.error("%s; left out of the directory", exc)
                continue
            now[name] = r
        with self._lock:
            for name in sorted(set(self.live) | set(now)):
                before, after = self.live.get(name), now.get(name)
                if before is not None and after is None:
                    changes.append(f"{name} lost (was pid {before.pid} at {before.endpoint})")
                elif after is not None and (before is None or before.pid != after.pid):  # Ray restarted it
                    changes.append(f"{name} live: {after.endpoint} pid {after.pid} on {after.node}")
            self.live = now
        return changes

    def run(self, stop: threading.Event) -> None:
        """Keep the directory current until `stop` is set."""
        while not stop.wait(WATCH_S):
            for line in self.watch_once():
                log.warning("%s", line)

    def close(self) -> None:
        if self.directory is not None:
            self.directory.close()
        for a in self.actors.values():
            try:
                ray.kill(a)
            except ray.exceptions.RayError as exc:  # already gone
                log.debug("kill: %s", exc)
        if self.pg is not None:
            remove_placement_group(self.pg)
        if ray.is_initialized():
            ray.shutdown()
