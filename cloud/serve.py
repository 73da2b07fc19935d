"""Running a cloud worker as a process: `serve` resolves the model, binds, and handles signals."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from edgesplit.runtime.models import resolve_store
from edgesplit.runtime.store import ModelStore

from .listener import check_bind
from .worker import CloudWorker

log = logging.getLogger(__name__)


def serve(model: str, bind: str, *, stop_event: threading.Event | None = None,
          precisions: tuple[str, ...] | None = None, **opts: Any) -> None:
    """Resolve `model` (a name, GGUF or store path) and serve it on `bind` until SIGINT/SIGTERM;
    SIGHUP re-reads the allow-list. `opts` go to CloudWorker. Signal handlers are installed only
    when called from the main thread, and restored on return."""
    if not logging.getLogger().handlers and not logging.getLogger("edgesplit").handlers:  # a bare launch still logs
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    check_bind(bind, opts.get("keys") is not None, bool(opts.get("insecure")))  # before the store loads
    kwargs = {} if precisions is None else {"precisions": tuple(precisions)}
    store = ModelStore(resolve_store(model, progress=False, **kwargs))
    stop_event = stop_event or threading.Event()
    reload_event = threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def _stop(signum, _frame) -> None:
            log.info("signal %d: stopping", signum)
            stop_event.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _stop)
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: reload_event.set())
    worker = CloudWorker(store, bind=bind, **opts)
    try:
        worker.serve_forever(stop_event, reload_event)
    finally:
        worker.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
