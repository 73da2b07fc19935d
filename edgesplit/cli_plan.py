"""CLI subcommands of the planner: `profile`, `plan` and `sweep` (parsing and printing only)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgesplit.cli_args import float_list, int_list, str_list
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.hparams import DEFAULT_MAX_SEQ_LEN
from edgesplit.runtime.models import DEFAULT_MODEL


def add_plan_commands(sub, common: argparse.ArgumentParser) -> None:
    """Register `profile`, `plan` and `sweep` on the top-level subparsers."""
    p = sub.add_parser("profile", parents=[common], help="measure this machine into a device profile (TOML)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="known model name, GGUF or store path")
    p.add_argument("--out", default=None, metavar="FILE", help="TOML to write (default: print it)")
    p.add_argument("--precisions", type=str_list, default=("q4", "q8", "f32"),
                   help="layer precisions to time (default q4,q8,f32)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads (default 2)")
    p.add_argument("--quiet-wait-s", type=float, default=20.0,
                   help="before each timing block, wait up to this long for other processes to leave a core free")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--memory-only", action="store_true",
                      help="measure only the memory figures again, into the profile --out names (timings kept)")
    only.add_argument("--codecs-only", action="store_true",
                      help="measure only the codec timings again (every default codec), into the profile --out names")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("plan", parents=[common], help="choose cut, precisions, codec and length for a device")
    p.add_argument("--device", required=True, help="device profile name (rpi4-4gb, ...) or TOML path")
    p.add_argument("--network", required=True, help="network profile name (lte, ...) or TOML path")
    p.add_argument("--cloud-profile", default="cpu-server", help="cloud profile name or TOML path (default cpu-server)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="known model name, GGUF or store path")
    p.add_argument("--objective", choices=("latency", "fidelity", "memory", "cost"), default="latency",
                   help="minimize ms per token, device MB or cloud USD per token, or maximize top-1 (default latency)")
    p.add_argument("--memory-mb", type=float, default=None, help="device memory limit (default: usable memory)")
    p.add_argument("--latency-ms", type=float, default=None, help="per-token latency limit, ms")
    p.add_argument("--ttft-ms", type=float, default=None, help="time-to-first-token limit, ms")
    p.add_argument("--min-top1", type=float, default=0.95, help="fidelity floor, top-1 agreement (default 0.95)")
    p.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN,
                   help=f"least KV capacity, tokens (default {DEFAULT_MAX_SEQ_LEN})")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for TTFT (default 128)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the plan JSON here (for --plan FILE)")
    p.add_argument("--pareto-json", default=None, metavar="FILE", help="write the Pareto front as JSON")
    p.add_argument("--plot", default=None, metavar="FILE", help="write the Pareto plot as PNG")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("plan-table", parents=[common],
                       help="the chosen cut against per-token latency targets, for each device profile")
    p.add_argument("--network", required=True, help="network profile name (lte, ...) or TOML path")
    p.add_argument("--latency-ms", required=True, type=float_list, metavar="X[,X...]",
                   help="per-token latency targets, ms")
    p.add_argument("--devices", type=str_list, default=(), metavar="D[,D...]", help="device profiles (default: every built-in)")
    p.add_argument("--cloud-profile", default="cpu-server", help="cloud profile name or TOML path (default cpu-server)")
    p.add_argument("--objective", choices=("latency", "fidelity", "memory", "cost"), default="cost")
    p.add_argument("--model", default=DEFAULT_MODEL, help="known model name, GGUF or store path")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    p.set_defaults(func=cmd_plan_table)

    p = sub.add_parser("plan-check", parents=[common],
                       help="measure a cut x codec grid over an emulated link; the planner's choices against it (JSON)")
    p.add_argument("--network", required=True, help="network profile name (lte, 3g-poor, ...) or TOML path")
    p.add_argument("--cuts", type=int_list, default=[1, 15, 29], help="cuts of the grid (default 1,15,29)")
    p.add_argument("--codecs", default="f32;f16;int8;ecq:step=0.2", help="codecs of the grid, ';'-separated")
    p.add_argument("--latency-ms", type=float_list, default=[], metavar="X[,X...]",
                   help="latency targets for the cloud-cost objective's choices (measured against them)")
    p.add_argument("--tokens", type=int, default=24, help="decode tokens per session (default 24)")
    p.add_argument("--passes", type=int, default=2, help="passes over the grid; medians (default 2)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="known model name, GGUF or store path")
    p.set_defaults(func=cmd_plan_check)

    p = sub.add_parser("sweep", parents=[common],
                       help="measure every cut over an emulated link, predicted vs measured (JSON)")
    p.add_argument("--network", default="loopback", help="network profile name or TOML path")
    p.add_argument("--model", default=DEFAULT_MODEL, help="known model name, GGUF or store path")
    p.add_argument("--device", default="host", help="measured device profile for the predictions (default host)")
    p.add_argument("--cloud-profile", default="host", help="cloud profile for the predictions (default host)")
    p.add_argument("--cuts", type=int_list, default=None, help="comma-separated cuts (default: every cut)")
    p.add_argument("--codec", default="f32")
    p.add_argument("--tokens", type=int, default=32, help="decode tokens per cut (default 32)")
    p.add_argument("--threads", type=int, default=None, help="threads on each side (default: the profile's)")
    p.add_argument("--passes", type=int, default=3, help="passes over the cuts; medians per cut (default 3)")
    p.add_argument("--quiet-wait-s", type=float, default=20.0,
                   help="before each cut, wait up to this long for other processes to leave a core free")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")
    p.set_defaults(func=cmd_sweep)


def cmd_profile(args: argparse.Namespace) -> int:
    from edgesplit.device.profiling.timing import ProfileSettings
    from edgesplit.device.profiling.profiler import profile_machine, remeasure_codecs, remeasure_memory, write_profile
    from edgesplit.profiles.toml_fields import to_toml
    from edgesplit.runtime.models import resolve_store
    from edgesplit.runtime.store import ModelStore

    precisions = args.precisions
    store = ModelStore(resolve_store(args.model, precisions=precisions))
    name = str(store.manifest.get("model_name") or args.model)
    settings = ProfileSettings(quiet_timeout_s=args.quiet_wait_s)
    from edgesplit.harness.worker_proc import WorkerProcess

    only = "--memory-only" if args.memory_only else "--codecs-only" if args.codecs_only else None
    if only and not args.out:
        raise ConfigError(f"{only} updates an existing profile: name it with --out FILE")
    base = _read_profile(Path(args.out), only) if only else None
    if args.codecs_only:
        assert base is not None
        print(write_profile(remeasure_codecs(store, base, threads=args.threads, settings=settings), Path(args.out)))
        return 0
    with WorkerProcess(str(store.path), store.config.d_model, threads=args.threads) as worker:
        if base is not None:
            profile = remeasure_memory(store, worker.endpoint, base, threads=args.threads, settings=settings)
        else:
            profile = profile_machine(store, worker.endpoint, model_name=name, precisions=precisions,
                                      threads=args.threads, settings=settings)
    if args.out:
        print(write_profile(profile, Path(args.out)))
    else:
        sys.stdout.write(to_toml(profile))
    return 0


def _read_profile(path: Path, flag: str) -> dict:
    """A measured device profile's TOML as a dict, checked by the strict loader first."""
    from edgesplit.profiles.device import FOLDER, device_profile_from_dict
    from edgesplit.profiles.toml_fields import read_profile_toml

    data, origin = read_profile_toml(path, FOLDER, "device")
    device_profile_from_dict(data, origin)
    if data.get("kind") != "measured" or "measured" not in data:
        raise ConfigError(f"{origin}: {flag} needs a profile written by `edgesplit profile` "
                          f"(kind 'measured'), this one is kind {data.get('kind')!r}")
    return data


def cmd_plan(args: argparse.Namespace) -> int:
    from edgesplit.device.planning.cost_model import FLASH_OPTIONS
    from edgesplit.device.planning.planner import Request
    from edgesplit.harness.plan_report import PlanReportRequest, plan_report

    request = Request(objective=args.objective, memory_mb=args.memory_mb, latency_ms=args.latency_ms,
                      ttft_ms=args.ttft_ms, min_top1=args.min_top1, max_seq_len=args.max_seq_len,
                      prompt_tokens=args.prompt_tokens, flash_options=FLASH_OPTIONS)
    report = plan_report(PlanReportRequest(args.device, args.network, args.cloud_profile, args.model, request,
                                           args.out, args.pareto_json, args.plot))
    if args.json:
        print(json.dumps(report))
    else:
        print(report["why"])
        print(json.dumps(report["plan"], indent=1, sort_keys=True))
    return 0


def cmd_plan_table(args: argparse.Namespace) -> int:
    from edgesplit.harness.cut_table import CutTableRequest, cut_table, format_cut_table
    from edgesplit.runtime.models import resolve_store
    from edgesplit.runtime.store import ModelStore

    req = CutTableRequest(args.network, tuple(args.latency_ms), args.devices,
                          args.cloud_profile, args.objective)
    rows = cut_table(ModelStore(resolve_store(args.model, precisions=("f32", "q4", "q8"))), req)
    print(json.dumps(rows) if args.json else format_cut_table(rows))
    return 0


def cmd_plan_check(args: argparse.Namespace) -> int:
    from edgesplit.harness.plan_check import PlanCheckRequest, plan_check
    from edgesplit.runtime.models import resolve_store
    from edgesplit.runtime.store import ModelStore

    req = PlanCheckRequest(args.network, tuple(args.cuts), tuple(c for c in args.codecs.split(";") if c.strip()),
                           tuple(args.latency_ms),
                           args.tokens, args.passes)
    print(json.dumps(plan_check(ModelStore(resolve_store(args.model, precisions=("q4", "f32"))), req)))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from edgesplit.harness.sweep import format_table, sweep

    result = sweep(args.model, args.network, cuts=args.cuts or None, codec=args.codec, tokens=args.tokens, device=args.device,
                   cloud=args.cloud_profile, threads=args.threads, passes=args.passes, quiet_wait_s=args.quiet_wait_s)
    print(json.dumps(result) if args.json else format_table(result))
    return 0
