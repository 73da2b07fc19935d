"""`edgesplit cloud pool`: N cloud workers as Ray actors, with the directory devices query."""

from __future__ import annotations

import argparse
import signal
import threading

from edgesplit.runtime.models import DEFAULT_MODEL


def add_pool_command(csub, common: argparse.ArgumentParser) -> None:
    """Register `cloud pool` under the `cloud` command's subparsers."""
    p = csub.add_parser("pool", parents=[common],
                        help="N workers as Ray actors (local cluster, or --address) and a directory for devices")
    p.add_argument("--model", default=DEFAULT_MODEL, help="known model name, GGUF or store path")
    p.add_argument("--replicas", type=int, required=True, help="workers to run")
    p.add_argument("--address", default=None,
                   help="an existing Ray cluster (HOST:PORT or auto); default: start a local one")
    p.add_argument("--directory", default="tcp://127.0.0.1:5590",
                   help="where devices ask for the live workers (default tcp://127.0.0.1:5590)")
    p.add_argument("--host", default="127.0.0.1", help="the address each worker binds (default 127.0.0.1)")
    p.add_argument("--base-port", type=int, default=0,
                   help="worker i listens on BASE+i, also after a restart (default: free ports, in the directory)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs per worker (default 1)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="Ray GPUs per worker (default 0)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads per worker (default: its CPUs)")
    p.add_argument("--keys", default=None, metavar="DIR", help="CurveZMQ keys folder, as for cloud serve")
    p.add_argument("--insecure", action="store_true", help="allow plain text on a non-loopback --host")
    p.add_argument("--max-sessions", type=int, default=16, help="concurrent sessions per worker (default 16)")
    p.add_argument("--max-sessions-per-device", type=int, default=4, help="per device, per worker (default 4)")
    p.add_argument("--max-kv-mb", type=float, default=None, help="MB of KV cache per worker (default: half available)")
    p.add_argument("--warm-plan", action="append", default=[], metavar="FILE",
                   help="every worker builds this plan's back segment at start (repeatable)")
    p.add_argument("--idle-timeout-s", type=float, default=60.0, help="evict a silent session after this (default 60)")
    p.set_defaults(func=cmd_cloud_pool)


def cmd_cloud_pool(args: argparse.Namespace) -> int:
    from edgesplit.cloud.pool import Pool, PoolSettings, WorkerLimits
    from edgesplit.runtime.plan import load_plan_file

    threads = args.threads if args.threads is not None else max(1, int(args.cpus_per_replica))
    limits = WorkerLimits(args.max_sessions, args.max_sessions_per_device, args.max_kv_mb, None, args.idle_timeout_s)
    settings = PoolSettings(args.model, args.replicas, args.address, args.cpus_per_replica, args.gpus_per_replica,
                            threads, args.host, args.base_port, args.directory, args.keys, args.insecure, limits,
                            tuple(load_plan_file(f) for f in args.warm_plan))
    stop = threading.Event()
    pool = Pool(settings)
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own handlers
        signal.signal(sig, lambda *_: stop.set())
    try:
        assert pool.directory is not None
        print(f"directory {pool.directory.endpoint}", flush=True)
        for r in pool.replicas():
            print(f"{r.name} {r.endpoint} pid {r.pid} node {r.node}", flush=True)
        pool.run(stop)
    finally:
        pool.close()
    return 0
