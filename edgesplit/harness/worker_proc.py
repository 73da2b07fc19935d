"""A cloud worker in its own process on loopback, for measurements that outlive one session.

`simulate` starts and stops a worker per run; the profiler's calibration and `edgesplit sweep`
keep one for many sessions (the worker caches one back segment per plan), restarting it when its
resident memory passes a limit; the fault tests kill it and start it again on its endpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
from pathlib import Path

import psutil

from edgesplit.runtime.memory import MB

from edgesplit.harness.simulate import free_port, start_worker, stop_worker, wait_ready

log = logging.getLogger(__name__)


class WorkerProcess:
    """`edgesplit cloud serve` for `store_path` on a loopback port chosen once (a restart comes
    back on the same endpoint); a context manager. `extra`: further `cloud serve` flags."""

    def __init__(self, store_path: str, d_model: int, *, threads: int = 2, max_rss_mb: float = 3000.0,
                 extra: tuple[str, ...] = ()):
        self.store_path, self.d_model, self.max_rss_mb = str(store_path), d_model, max_rss_mb
        self.threads, self.extra = threads, tuple(extra)
        self.proc: subprocess.Popen | None = None
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self._err_path: Path | None = None

    def start(self, wait: bool = True) -> "WorkerProcess":
        """Start the worker; with `wait`, until it answers (else a device finds it once it is up)."""
        self._drop_log()
        fd, name = tempfile.mkstemp(prefix="edgesplit-worker-", suffix=".log")
        os.close(fd)
        self._err_path = Path(name)
        self.proc = start_worker(self.store_path, self.endpoint, ("--threads", str(self.threads), *self.extra),
                                 self._err_path)
        if wait:
            self.wait()
        return self

    def wait(self) -> None:
        """Until the (started) worker answers."""
        assert self.proc is not None
        wait_ready(self.endpoint, self.d_model, self.proc, stderr_path=self._err_path)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_mb(self) -> float:
        """Resident memory of the worker process, MB."""
        return psutil.Process(self.proc.pid).memory_info().rss / MB if self.proc else 0.0

    def recycle_if_big(self) -> None:
        """Restart the worker when it holds more than max_rss_mb (many cached back segments)."""
        if self.proc is not None and self.rss_mb() > self.max_rss_mb:
            log.info("restarting the cloud worker (%.0f MB resident)", self.rss_mb())
            self.stop()
            self.start()

    def kill(self) -> None:
        """SIGKILL the worker, as a crash would (no goodbye to its sessions)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """Terminate the worker (kill after 10 s) and remove its log."""
        if self.proc is not None and self.proc.poll() is None:
            stop_worker(self.proc)
        self.proc = None
        self._drop_log()

    def _drop_log(self) -> None:
        if self._err_path is not None:
            self._err_path.unlink(missing_ok=True)
            self._err_path = None

    def __enter__(self) -> "WorkerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
