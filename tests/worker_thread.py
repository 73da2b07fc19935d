"""A CloudWorker serving in a background thread of the test process, for tests of the worker and its link."""

from __future__ import annotations

import contextlib
import threading

from edgesplit.cloud.worker import CloudWorker


@contextlib.contextmanager
def running_worker(store, **kwargs):
    """A CloudWorker serving in a background thread on a random port; stopped and closed on exit."""
    worker = CloudWorker(store, bind="tcp://127.0.0.1:0", threads=1, **kwargs)
    stop = threading.Event()
    thread = threading.Thread(target=worker.serve_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(5)
        assert not thread.is_alive(), "worker did not stop within 5 s"
        worker.close()
