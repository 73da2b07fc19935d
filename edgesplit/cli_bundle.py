"""`edgesplit bundle`: a device's front as a LiteRT model in a self-describing folder."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

from edgesplit.cli_args import int_list
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.models import DEFAULT_MODEL


def add_bundle_command(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("bundle", parents=[common],
                       help="write a device's bundle: its plan, front.tflite (LiteRT), tokenizer, codec table")
    p.add_argument("--device", default=None, help="device profile to plan for (rpi4-4gb, ...) or TOML path")
    p.add_argument("--network", default=None, help="network profile to plan for (lte, ...) or TOML path")
    p.add_argument("--cloud-profile", default="cpu-server", help="cloud profile to plan for (default cpu-server)")
    p.add_argument("--plan", default=None, metavar="FILE", help="take this plan instead of planning")
    p.add_argument("--cut", type=int, default=None, help="or: the default plan at this cut (with --codec, --max-seq-len)")
    p.add_argument("--codec", default="f32", help="with --cut: the activation codec (default f32)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="with --cut: KV capacity (default 2048)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="known model name, GGUF or store path")
    p.add_argument("--out", required=True, metavar="DIR", help="the bundle folder (replaced atomically)")
    p.add_argument("--weights", choices=("f32", "q4", "int8"), default="f32",
                   help="front layer weights: f32 (the GGUF's Q4_1 values dequantized, fp32 compute; default), "
                        "q4 (the same blocks as int4 + block offsets: 3.3x smaller, int8 activations) or int8")
    p.add_argument("--outlier-channels", type=int, default=None, metavar="N",
                   help="q4: calibrated input channels per projection kept in fp32 (default 8)")
    p.add_argument("--lean", action="store_true",
                   help="only decode and prefill_T (no decode_k128/k512 or prefill_T_k0 reading fewer cache rows): "
                        "XNNPACK packs the weights once per signature, so fewer signatures hold less memory; "
                        "steps attend over all max_seq_len rows (slower)")
    p.add_argument("--prefill-lengths", type=int_list, default=None, metavar="T[,T...]",
                   help="prompt-length buckets, one prefill_T signature each (default 16,64,256)")
    p.add_argument("--golden", default=None, metavar="FILE",
                   help="also write golden vectors (prompt ids, hidden states at the cut, one session's frames) as JSON")
    p.add_argument("--golden-prompt", default="What is the capital of France?", help="the golden session's prompt")
    p.set_defaults(func=cmd_bundle)


def cmd_bundle(args: argparse.Namespace) -> int:
    from edgesplit.device.bundle.bundle import DEFAULT_PREFILL_LENGTHS, BundleSettings, write_bundle
    from edgesplit.device.bundle.front_graph import DEFAULT_OUTLIER_CHANNELS
    from edgesplit.runtime.models import resolve_store
    from edgesplit.runtime.plan import check_plan_store, load_plan_file
    from edgesplit.runtime.store import ModelStore

    chosen = [x for x in (args.plan, args.cut, args.device and args.network) if x is not None]
    if len(chosen) != 1:
        raise ConfigError("give one of --device PROFILE --network NET (plan for them), --plan FILE or --cut K")
    store = ModelStore(resolve_store(args.model, precisions=("f32", "q4", "q8")))
    if args.cut is not None:
        from edgesplit.runtime.plan import PlanSettings, make_plan

        plan = make_plan(store, PlanSettings(args.cut, args.codec, max_seq_len=args.max_seq_len))
    elif args.plan is not None:
        plan = load_plan_file(args.plan)
        check_plan_store(plan, store, f"--plan {args.plan}")
    else:
        from edgesplit.device.planning.planner import plan_for

        plan = plan_for(args.device, args.network, store, cloud=args.cloud_profile)
    if plan.front_flash != "resident":
        raise ConfigError(f"the plan streams its front from flash (front_flash {plan.front_flash!r}); a bundle holds "
                          "the whole front in the LiteRT model: plan with more memory, or without flash")
    board = Path(str(resources.files("edgesplit.firmware_configs") / f"{args.device}.toml"))
    settings = BundleSettings(args.weights, tuple(args.prefill_lengths or DEFAULT_PREFILL_LENGTHS),
                              DEFAULT_OUTLIER_CHANNELS if args.outlier_channels is None else args.outlier_channels,
                              not args.lean)
    out = write_bundle(store, plan, args.out, settings, daemon_config=board if args.device and board.is_file() else None)
    manifest = json.loads((out / "manifest.json").read_text())
    size = manifest["files"]["front.tflite"]["bytes"]
    print(f"{out}: cut {plan.cut}, codec {plan.codec}, max_seq_len {plan.max_seq_len}, front.tflite {size / 1e6:.1f} MB "
          f"({args.weights}) vs {manifest['front']['shard_bytes'] / 1e6:.1f} MB of store shards", file=sys.stderr)
    if args.golden is not None:
        from edgesplit.harness.golden import golden

        text = json.dumps(golden(store, out, args.golden_prompt), indent=1) + "\n"
        tmp = Path(args.golden).with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(args.golden)  # whole or not at all
        print(f"{args.golden}: golden vectors of {out}", file=sys.stderr)
    return 0
