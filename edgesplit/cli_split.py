"""CLI subcommands of the split: `cloud serve`, `device run`, `simulate` and `loadtest` (parsing and printing)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgesplit.cli_args import int_list, str_list
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.generate import GenerationRequest
from edgesplit.runtime.hparams import DEFAULT_MAX_SEQ_LEN
from edgesplit.runtime.models import DEFAULT_MODEL
from edgesplit.runtime.sampling import SamplingParams

from .cli_pool import add_pool_command


def _add_split_flags(p: argparse.ArgumentParser) -> None:
    """Plan and sampling flags shared by `device run` and `simulate`.

    Plan flags default to None: without --plan the defaults of runtime.plan.PlanSettings apply;
    with --plan (or --device) a plan flag given explicitly must agree with the plan.
    """
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"known model name, GGUF or store path (default {DEFAULT_MODEL})")
    p.add_argument("--plan", default=None, metavar="FILE",
                   help="a plan JSON file (runtime.plan.Plan.to_json): cut, precisions, codec, max_seq_len from it")
    p.add_argument("--cut", type=int, default=None, help="device runs layers [0, CUT), the cloud [CUT, L) (or --plan)")
    p.add_argument("--device", default=None, metavar="D",
                   help="plan on the fly from this device profile (e.g. rpi4-4gb) and --network: cut, precisions, codec")
    p.add_argument("--cloud-profile", default=None, metavar="C",
                   help="with --device: the cloud profile to plan for (default: host for simulate, cpu-server for device run)")
    p.add_argument("--codec", default=None, help="activation codec (default f32), e.g. f16, int8, ts+tabq:tau=40,budget=0.1,rotate=1")
    p.add_argument("--network", default="loopback", help="emulated link profile (loopback, wifi, lte, 5g, 3g-poor) or TOML path")
    p.add_argument("--precision", default=None, help="front and back layer precision (default q4)")
    p.add_argument("--head-precision", default=None, help="embedding/head precision (default q8)")
    p.add_argument("--kv-precision", default=None, help="KV cache precision on both sides (default f32)")
    p.add_argument("--accuracy-level", type=int, default=None, help="MatMulNBits accuracy level on both sides (default 4)")
    p.add_argument("--max-seq-len", type=int, default=None, help=f"KV capacity on both sides (default {DEFAULT_MAX_SEQ_LEN})")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="1 = off; penalizes prompt and generated tokens exactly as the local engine does")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=2, help="device onnxruntime threads (default 2)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--device-key", default=None, metavar="FILE",
                   help="this device's secret key (NAME.key_secret) for a CurveZMQ worker; with --cloud-key")
    p.add_argument("--cloud-key", default=None, metavar="FILE", help="the worker's public key (cloud.key)")
    p.add_argument("--flash-embedding", action="store_true",
                   help="read embedding rows from flash instead of holding the table (same output, ~28 MB less); "
                        "the plan's front_flash 'embedding'")
    p.add_argument("prompt", metavar="PROMPT")


def add_split_commands(sub, common: argparse.ArgumentParser) -> None:
    """Register `cloud serve`, `device run`, `simulate` and `loadtest` on the top-level subparsers."""
    cloud = sub.add_parser("cloud", parents=[common], help="the cloud worker")
    csub = cloud.add_subparsers(dest="cloud_command", required=True, metavar="COMMAND")
    p = csub.add_parser("serve", parents=[common], help="serve back segments to devices over ZeroMQ")
    p.add_argument("--model", default=DEFAULT_MODEL, help="known model name, GGUF or store path")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555", help="ZeroMQ endpoint (default tcp://127.0.0.1:5555)")
    p.add_argument("--max-sessions", type=int, default=16, help="concurrent sessions (default 16)")
    p.add_argument("--max-sessions-per-device", type=int, default=4, help="sessions one device may hold (default 4)")
    p.add_argument("--max-kv-mb", type=float, default=None,
                   help="MB of KV cache all sessions may reserve together (default: half the memory available)")
    p.add_argument("--max-kv-mb-per-device", type=float, default=None,
                   help="MB of KV cache one device's sessions may reserve (default: no per-device cap)")
    p.add_argument("--keys", default=None, metavar="DIR",
                   help="CurveZMQ: encrypt, and serve only devices enrolled in DIR (edgesplit keys init-cloud)")
    p.add_argument("--insecure", action="store_true",
                   help="allow plain text on a non-loopback --bind (anyone reaching the port can use the worker)")
    p.add_argument("--warm-plan", action="append", default=[], metavar="FILE",
                   help="build this plan's back segment at start (repeatable); other plans build at first use")
    p.add_argument("--idle-timeout-s", type=float, default=60.0, help="evict a silent session after this (default 60)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads (default 2)")
    p.add_argument("--prefill-chunk", type=int, default=128, metavar="N",
                   help="run prompts longer than N positions N at a time, between other sessions' steps (0: whole)")
    p.set_defaults(func=cmd_cloud_serve)
    add_pool_command(csub, common)

    device = sub.add_parser("device", parents=[common], help="the device client")
    dsub = device.add_subparsers(dest="device_command", required=True, metavar="COMMAND")
    p = dsub.add_parser("run", parents=[common], help="generate with the back segment on a cloud worker")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--cloud", type=str_list, metavar="A[,B...]",
                       help="the worker's ZeroMQ endpoint, e.g. tcp://10.0.0.2:5555; more, comma-separated, for failover")
    where.add_argument("--directory", metavar="ENDPOINT",
                       help="a worker pool's directory (edgesplit cloud pool): the session goes to its hashed worker")
    p.add_argument("--timeout-s", type=float, default=30.0, help="give up when the cloud is silent this long")
    p.add_argument("--bundle", default=None, metavar="DIR",
                   help="run the front of this bundle (edgesplit bundle) in LiteRT: its plan, tokenizer and codec table")
    _add_split_flags(p)
    p.set_defaults(func=cmd_device_run)

    p = sub.add_parser("simulate", parents=[common],
                       help="a split run on loopback: cloud worker process + this device, emulated link")
    _add_split_flags(p)
    p.add_argument("--runs", type=int, default=1, help="generations against the one worker; figures are medians (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--bundle", default=None, metavar="DIR",
                   help="the device front from this bundle, in LiteRT (its plan; the worker serves --model)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("loadtest", parents=[common],
                       help="N device processes against one cloud worker for a fixed time (JSON)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--cut", type=int, default=15)
    p.add_argument("--devices", type=int, default=16)
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--codec", default="f32")
    p.add_argument("--network", default="loopback")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per session (default 32)")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--sessions-per-device", type=int, default=1,
                   help="concurrent sessions per device process (threads sharing its front; default 1)")
    p.set_defaults(func=cmd_loadtest)

    p = sub.add_parser("faulttest", parents=[common],
                       help="SIGKILL the cloud worker mid-generation many times; tokens must not change (JSON)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--cut", type=int, default=15)
    p.add_argument("--codec", default="f32")
    p.add_argument("--runs", type=int, default=20, help="kills per case (default 20)")
    p.add_argument("--tokens", type=int, default=200, help="tokens per generation (default 200)")
    p.add_argument("--contexts", type=int_list, default=[64, 1024], help="prompt lengths, tokens (default 64,1024)")
    p.add_argument("--modes", type=str_list, default=("restart", "second"),
                   help="restart (same endpoint) and/or second (failover)")
    p.add_argument("--samplings", type=str_list, default=("greedy", "seeded"), help="greedy and/or seeded")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    p.set_defaults(func=cmd_faulttest)

    p = sub.add_parser("hostile", parents=[common],
                       help="malformed and hostile frames from several sockets while one honest session runs (JSON)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--cut", type=int, default=15)
    p.add_argument("--frames", type=int, default=10_000, help="hostile frames in all (default 10000)")
    p.add_argument("--sockets", type=int, default=4, help="attacker sockets (default 4)")
    p.add_argument("--tokens", type=int, default=64, help="tokens of the honest generation (default 64)")
    p.set_defaults(func=cmd_hostile)


def _request(args) -> GenerationRequest:
    """The generation request of the flags (checked when made)."""
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed)
    return GenerationRequest(args.prompt, args.max_tokens, args.chat, params)


def _split(args):
    """(store, plan) of the flags: a plan from --plan FILE or --device D (flags given explicitly must
    agree with it), or PlanSettings from --cut and the plan flags."""
    from edgesplit.runtime.plan import PlanSettings, check_plan_agrees, load_plan_file, resolve_split

    given = [flag for flag, value in (("--cut", args.cut), ("--plan", args.plan), ("--device", args.device))
             if value is not None]
    if not given:
        raise ConfigError("give --cut K, --plan FILE or --device D (plan from the device and --network profiles)")
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} each choose the split: give one of them")
    explicit = dict(codec=args.codec, front_precision=args.precision, back_precision=args.precision,
                    head_precision=args.head_precision, kv_precision=args.kv_precision,
                    max_seq_len=args.max_seq_len, accuracy_level=args.accuracy_level,
                    front_flash="embedding" if args.flash_embedding else None)
    if args.cut is not None:
        settings = PlanSettings(args.cut, **{k: v for k, v in explicit.items() if v is not None})
        return resolve_split(args.model, settings)
    if args.device is not None:
        plan, source = _plan_from_profiles(args), f"--device {args.device} --network {args.network}"
    else:
        plan, source = load_plan_file(args.plan), f"--plan {args.plan}"
    check_plan_agrees(plan, explicit, source)
    return resolve_split(args.model, plan, source)


def _plan_from_profiles(args):
    """The planner's choice for --device, --network and the cloud profile (minimum latency)."""
    from edgesplit.device.planning.planner import plan_for
    from edgesplit.runtime.models import resolve_store
    from edgesplit.runtime.store import ModelStore

    cloud = args.cloud_profile or ("host" if args.command == "simulate" else "cpu-server")
    store = ModelStore(resolve_store(args.model, precisions=("f32", "q4", "q8")))
    plan = plan_for(args.device, args.network, store, cloud=cloud)
    print(f"plan for {args.device} over {args.network} (cloud {cloud}): cut {plan.cut}, {plan.front_precision}/"
          f"{plan.back_precision} layers, KV {plan.kv_precision}, codec {plan.codec}, front {plan.front_flash}, "
          f"predicted {plan.predicted_ms_per_token:.1f} ms/token, {plan.predicted_device_memory_mb:.0f} MB on the "
          f"device (budget {plan.memory_budget_mb:.0f} MB)", file=sys.stderr)
    return plan


def cmd_cloud_serve(args: argparse.Namespace) -> int:
    from edgesplit.cloud.serve import serve
    from edgesplit.runtime.plan import load_plan_file
    from edgesplit.transport.security import ServerKeys

    keys = None if args.keys is None else ServerKeys.load(args.keys)  # a bad keys folder fails at start
    serve(args.model, args.bind, max_sessions=args.max_sessions, max_sessions_per_device=args.max_sessions_per_device,
          idle_timeout_s=args.idle_timeout_s, threads=args.threads, max_kv_mb=args.max_kv_mb,
          max_kv_mb_per_device=args.max_kv_mb_per_device, keys=keys, insecure=args.insecure,
          warm_plans=[load_plan_file(f) for f in args.warm_plan], prefill_chunk=args.prefill_chunk)
    return 0


def _stream(resp) -> None:
    if resp.text:
        sys.stdout.write(resp.text)
        sys.stdout.flush()


def cmd_device_run(args: argparse.Namespace) -> int:
    from edgesplit.device.split import load_front, run_split
    from edgesplit.profiles.network import load_network_profile
    from edgesplit.runtime.generate import load_tokenizer
    from edgesplit.runtime.memory import available_memory_mb, peak_rss_mb
    from edgesplit.transport.channel import RemoteError
    from edgesplit.transport.link import EmulatedLink
    from edgesplit.transport.protocol import PLAN_MISMATCH

    request = _request(args)
    curve = _curve(args)
    if args.bundle is not None:
        store, plan, tok, front, table = _bundle_front(args)
    else:
        store, plan = _split(args)
        tok, front, table = load_tokenizer(store), load_front(store, plan, threads=args.threads), None
    budget = plan.check_memory(available_memory_mb())
    link = EmulatedLink(load_network_profile(args.network)) if args.network != "loopback" else None
    last = None
    endpoints = None if args.cloud is None else list(args.cloud)
    recoveries: list = []
    try:
        for last in run_split(store, endpoints, plan, request.prompt_ids(tok), request.params, request.max_tokens,
                              link, tokenizer=tok, front=front, timeout_s=args.timeout_s, curve=curve,
                              recoveries=recoveries, directory=args.directory, codec_table=table):
            _stream(last)
    except RemoteError as exc:
        if args.bundle is None or exc.code != PLAN_MISMATCH:
            raise
        raise ConfigError(f"{Path(args.bundle) / 'manifest.json'}: this bundle was made for model {plan.model.name!r} "
                          f"with store fingerprint {plan.model.fingerprint[:16]}...; the worker serves another store "
                          f"({exc})") from None
    sys.stdout.write("\n")
    if last is not None:
        print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | decode: "
              f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | cut {plan.cut}, codec {plan.codec} "
              f"| peak RSS {peak_rss_mb():.0f} MB of budget {budget:.0f} MB | finish: {last.finish_reason}"
              + "".join(f" | recovered at {r.endpoint} in {r.ms:.0f} ms ({r.replayed_positions} positions replayed)"
                        for r in recoveries), file=sys.stderr)
    return 0


def _bundle_front(args):
    """(None, plan, tokenizer, LiteRT front, codec table) of --bundle DIR; the plan flags may not be given."""
    from edgesplit.device.bundle.bundle import Bundle

    given = [f for f, v in (("--cut", args.cut), ("--plan", args.plan), ("--device", args.device)) if v is not None]
    if given:
        raise ConfigError(f"--bundle carries its plan: drop {' and '.join(given)}")
    bundle = Bundle.open(args.bundle)
    return None, bundle.plan, bundle.tokenizer(), bundle.load_front(args.threads), bundle.codec_table()


def _curve(args):
    """This device's CurveZMQ keys from --device-key and --cloud-key (both or neither)."""
    if (args.device_key is None) != (args.cloud_key is None):
        raise ConfigError("--device-key and --cloud-key go together (this device's secret key, the worker's public)")
    if args.device_key is None:
        return None
    from edgesplit.transport.security import device_keys

    return device_keys(args.device_key, args.cloud_key)


def cmd_simulate(args: argparse.Namespace) -> int:
    from edgesplit.harness.simulate import simulate

    request = _request(args)
    curve = _curve(args)
    front = None
    if args.bundle is not None:
        from edgesplit.runtime.models import resolve_store
        from edgesplit.runtime.plan import check_plan_store
        from edgesplit.runtime.store import ModelStore

        _, plan, _, front, _ = _bundle_front(args)
        store = ModelStore(resolve_store(args.model, precisions=plan.precisions))
        check_plan_store(plan, store, f"bundle {args.bundle}")
    else:
        store, plan = _split(args)
    # the worker simulate starts serves the keys folder the worker's public key lives in
    worker_keys = None if args.cloud_key is None else str(Path(args.cloud_key).resolve().parent)
    result = simulate(store, plan, request, args.network, runs=args.runs, threads=args.threads,
                      on_token=None if args.json else _stream, curve=curve, worker_keys=worker_keys, front=front)
    if args.json:
        print(json.dumps(result))
        return 0
    b, f = result["breakdown_ms"], result["framework_ms"]
    print(f"\nper token {result['per_token_ms']:.2f} ms ({result['tok_s']:.1f} tok/s), first token "
          f"{result['ttft_ms']:.1f} ms, {result['bytes_per_token']:.0f} B/token up | "
          + ", ".join(f"{k} {v:.2f}" for k, v in b.items())
          + f" ms | overhead {result['overhead_ratio']:.2f} (framework: "
          + ", ".join(f"{k} {v:.2f}" for k, v in f.items())
          + f" ms) | peak RSS {result['peak_rss_mb']:.0f} MB of budget {result['memory_budget_mb']:.0f} MB"
          + f" | medians of {result['runs']} run(s)",
          file=sys.stderr)
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from edgesplit.harness.loadtest import LoadtestRequest, loadtest
    from edgesplit.runtime.plan import PlanSettings, resolve_split

    request = LoadtestRequest(args.devices, args.duration_s, args.max_tokens, args.network, args.sessions_per_device)
    store, plan = resolve_split(args.model, PlanSettings(args.cut, args.codec, max_seq_len=args.max_seq_len))
    print(json.dumps(loadtest(store, plan, request)))
    return 0


def cmd_faulttest(args: argparse.Namespace) -> int:
    from edgesplit.harness.faulttest import FaultRequest, faulttest
    from edgesplit.runtime.plan import PlanSettings, resolve_split

    req = FaultRequest(args.runs, args.tokens, tuple(args.contexts), args.modes, args.samplings, args.seed)
    max_seq_len = -(-(max(req.contexts) + req.tokens) // 256) * 256  # rounded up to 256
    store, plan = resolve_split(args.model, PlanSettings(args.cut, args.codec, max_seq_len=max_seq_len))
    print(json.dumps(faulttest(store, plan, req)))
    return 0


def cmd_hostile(args: argparse.Namespace) -> int:
    from edgesplit.harness.hostile import HostileRequest, hostile
    from edgesplit.runtime.plan import PlanSettings, resolve_split

    req = HostileRequest(args.frames, args.sockets, args.tokens)
    store, plan = resolve_split(args.model, PlanSettings(args.cut, max_seq_len=256))
    print(json.dumps(hostile(store, plan, req)))
    return 0
