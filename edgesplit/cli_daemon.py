"""CLI of the device daemon: `edgesplit daemon [run] --config FILE` and `edgesplit daemon unit --config FILE`."""

from __future__ import annotations

import argparse
import logging


def add_daemon_commands(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("daemon", parents=[common],
                       help="the device daemon: an OpenAI-compatible API on this board (or: daemon unit)")
    p.add_argument("action", nargs="?", choices=("run", "unit"), default="run",
                   help="run (default) or unit: print the systemd unit for the config")
    p.add_argument("--config", required=True, metavar="FILE",
                   help="a board name (rpi4-4gb, host, ...), 'auto' (from /proc/device-tree/model) or a TOML path")
    p.add_argument("--host", default=None, help="listen address (overrides the config and EDGESPLIT_HOST)")
    p.add_argument("--port", default=None, help="listen port")
    p.add_argument("--cloud", default=None, metavar="A[,B...]", help="cloud endpoints in failover order")
    p.add_argument("--directory", default=None, metavar="ENDPOINT",
                   help="a worker pool's directory (edgesplit cloud pool) instead of fixed endpoints")
    p.add_argument("--threads", default=None, help="onnxruntime threads of the front")
    p.add_argument("--api-key", default=None, help="Bearer key the API requires")
    p.add_argument("--bundle", default=None, metavar="DIR",
                   help="serve this bundle's plan with its front in LiteRT (overrides the config's [plan] bundle)")
    p.add_argument("--exe", default="/usr/local/bin/edgesplit", help="with unit: the edgesplit executable's path")
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("daemon-bench", parents=[common],
                       help="time to first token and per token through the daemon's API vs simulate (JSON)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--cut", type=int, default=15)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=64)
    p.set_defaults(func=cmd_daemon_bench)


def cmd_daemon(args: argparse.Namespace) -> int:
    import dataclasses

    from edgesplit.firmware_configs.config import FirmwareConfig, load_config

    flags = {"host": args.host, "port": args.port, "cloud_endpoints": args.cloud, "cloud_directory": args.directory,
             "threads": args.threads,
             "api_key": args.api_key}

    def load() -> FirmwareConfig:
        cfg = load_config(args.config, flags)
        if args.bundle is None:
            return cfg
        cfg = dataclasses.replace(cfg, plan=dataclasses.replace(cfg.plan, bundle=args.bundle, plan_file=None),
                                  source=f"{cfg.source} (with --bundle)")
        cfg.check()
        return cfg

    cfg = load()
    if args.action == "unit":
        from edgesplit.device.daemon.server import systemd_unit

        print(systemd_unit(cfg, args.config, args.exe), end="")
        return 0
    from edgesplit.device.daemon.server import serve_daemon
    from edgesplit.transport.security import device_keys

    logging.getLogger("edgesplit").setLevel(cfg.log_level.upper())
    curve = None if cfg.device_key_file is None else device_keys(cfg.device_key_file, cfg.cloud_key_file or "")
    serve_daemon(cfg, curve, reload=load)
    return 0


def cmd_daemon_bench(args: argparse.Namespace) -> int:
    import json

    from edgesplit.harness.daemon_bench import DaemonBenchRequest, daemon_bench
    from edgesplit.runtime.plan import PlanSettings, resolve_split

    req = DaemonBenchRequest(args.runs, args.max_tokens)
    store, plan = resolve_split(args.model, PlanSettings(args.cut, max_seq_len=512))
    print(json.dumps(daemon_bench(store, plan, req)))
    return 0
