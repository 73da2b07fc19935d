"""Running the daemon: uvicorn serving the app, the model loading behind /health, systemd's notify
protocol, and the systemd unit for a board config.

sd_notify (`NOTIFY_SOCKET`, a datagram socket) gets `READY=1` once the front is loaded,
`WATCHDOG=1` from the event loop every half `WATCHDOG_USEC` (so a stuck loop trips the watchdog)
and `STOPPING=1` at shutdown. SIGTERM (uvicorn's handling) stops accepting connections and lets
in-flight streams finish within the grace period, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
from typing import Callable

import uvicorn

from edgesplit.device.daemon.app import build_app
from edgesplit.device.daemon.metrics import Metrics
from edgesplit.device.daemon.service import DaemonService
from edgesplit.firmware_configs.config import FirmwareConfig
from edgesplit.runtime.errors import ConfigError

log = logging.getLogger(__name__)
GRACE_S = 30  # in-flight streams finish within this after SIGTERM


def sd_notify(state: str) -> bool:
    """Send `state` to systemd when run as a Type=notify service (NOTIFY_SOCKET); False otherwise."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), address)
    return True


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}): the port is in use or the "
                              "address is not this machine's; change 'port' / 'host' (or --port / --host)") from None


def serve_daemon(cfg: FirmwareConfig, curve=None, reload: Callable[[], FirmwareConfig] | None = None) -> None:
    """Serve the API until SIGTERM/SIGINT; the model loads in the background (/health says 503 until
    ready). SIGHUP calls `reload` (re-reading the config) and applies what can change live."""
    _check_port_free(cfg.host, cfg.port)
    service, metrics = DaemonService(cfg, curve), Metrics()
    failure: list[BaseException] = []

    def load() -> None:
        try:
            service.load()
            sd_notify("READY=1")
        except BaseException as exc:  # noqa: BLE001 -- reported below and ends the process
            failure.append(exc)
            server.should_exit = True

    app = build_app(service, metrics)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                            timeout_graceful_shutdown=GRACE_S, lifespan="off")
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM/SIGINT while serving (graceful shutdown) and re-raises the signal
    # after: this handler receives it then, so a clean shutdown exits 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    if reload is not None:
        def on_hup(*_) -> None:
            try:
                service.reconfigure(reload())
            except ConfigError as exc:  # a bad edit keeps the running config
                log.error("SIGHUP: config not reloaded: %s", exc)

        signal.signal(signal.SIGHUP, on_hup)
    threading.Thread(target=load, name="edgesplit-load", daemon=True).start()

    async def watchdog() -> None:
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        while usec > 0:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(usec / 2e6)

    async def main() -> None:
        task = asyncio.create_task(watchdog())
        try:
            await server.serve()
        finally:
            task.cancel()
            sd_notify("STOPPING=1")

    asyncio.run(main())
    if failure:
        raise failure[0]


def systemd_unit(cfg: FirmwareConfig, config_path: str, exe: str = "/usr/local/bin/edgesplit") -> str:
    """A systemd unit for the daemon of `cfg` (Type=notify, watchdog, restart, hardening)."""
    memory_max_bytes = int(cfg.memory_budget_mb * 1.25e6)  # the runtime budget (MB) plus the server slack
    return f"""[Unit]
Description=edgesplit device daemon ({cfg.board}: {cfg.description})
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
ExecStart={exe} daemon --config {config_path}
WatchdogSec=30
Restart=on-failure
RestartSec=5
TimeoutStopSec={GRACE_S + 10}
DynamicUser=yes
StateDirectory=edgesplit
Environment=EDGESPLIT_CACHE=/var/lib/edgesplit
MemoryMax={memory_max_bytes}
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
NoNewPrivileges=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
LockPersonality=yes
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"""
