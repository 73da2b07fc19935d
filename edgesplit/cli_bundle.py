"""`edgesplit bundle`: a device's front as a LiteRT model in a self-describing folder."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.models import DEFAULT_MODEL


def _lengths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated prompt lengths, got {text!r}") from None


def add_bundle_command(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("bundle", parents=[common],
                       help="write a device's bundle: its plan, front.tflite (LiteRT), tokenizer, codec table")
    p.add_argument("--device", default=None, help="device profile to plan for (rpi4-4gb, ...) or TOML path")
    p.add_argument("--network", default=None, help="network profile to plan for (lte, ...) or TOML path")
    p.add_argument("--cloud-profile", default="cpu-server", help="cloud profile to plan for (default cpu-server)")
    p.add_argument("--plan", default=None, metavar="FILE", help="take this plan instead of planning")
    p.add_argument("--model", default=DEFAULT_MODEL, help="known model name, GGUF or store path")
    p.add_argument("--out", required=True, metavar="DIR", help="the bundle folder (replaced atomically)")
    p.add_argument("--weights", choices=("f32", "int8"), default="f32",
                   help="front layer weights: f32 (the GGUF's Q4_1 values, exact; default) or int8 per channel")
    p.add_argument("--prefill-lengths", type=_lengths, default=None, metavar="T[,T...]",
                   help="prompt-length buckets, one prefill_T signature each (default 16,64,256)")
    p.set_defaults(func=cmd_bundle)


def cmd_bundle(args: argparse.Namespace) -> int:
    from edgesplit.device.bundle.bundle import DEFAULT_PREFILL_LENGTHS, BundleSettings, write_bundle
    from edgesplit.runtime.models import resolve_store
    from edgesplit.runtime.plan import check_plan_store, load_plan_file
    from edgesplit.runtime.store import ModelStore

    if (args.plan is None) == (args.device is None or args.network is None):
        raise ConfigError("give --device PROFILE --network NET (plan for them) or --plan FILE")
    store = ModelStore(resolve_store(args.model, precisions=("f32", "q4", "q8")))
    if args.plan is not None:
        plan = load_plan_file(args.plan)
        check_plan_store(plan, store, f"--plan {args.plan}")
    else:
        from edgesplit.device.planning.planner import plan_for

        plan = plan_for(args.device, args.network, store, cloud=args.cloud_profile)
    if plan.front_flash != "resident":
        raise ConfigError(f"the plan streams its front from flash (front_flash {plan.front_flash!r}); a bundle holds "
                          "the whole front in the LiteRT model: plan with more memory, or without flash")
    board = Path(str(resources.files("edgesplit.firmware_configs") / f"{args.device}.toml"))
    settings = BundleSettings(args.weights, args.prefill_lengths or DEFAULT_PREFILL_LENGTHS)
    out = write_bundle(store, plan, args.out, settings, daemon_config=board if args.device and board.is_file() else None)
    manifest = json.loads((out / "manifest.json").read_text())
    size = manifest["files"]["front.tflite"]["bytes"]
    print(f"{out}: cut {plan.cut}, codec {plan.codec}, max_seq_len {plan.max_seq_len}, front.tflite {size / 1e6:.1f} MB "
          f"({args.weights}) vs {manifest['front']['shard_bytes'] / 1e6:.1f} MB of store shards", file=sys.stderr)
    return 0
