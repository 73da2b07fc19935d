"""The `edgesplit` command: argument parsing and printing only; the work lives in `edgesplit.runtime`.

    edgesplit pull NAME
    edgesplit convert MODEL --out DIR [--precisions q4,q8,f16,f32]
    edgesplit generate [--model M] [--chat] [...] PROMPT
    edgesplit eval --text FILE [...]
    edgesplit bench [--vs llama.cpp] [...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from edgesplit import __version__
from edgesplit.cli_args import int_list, str_list
from edgesplit.cli_bundle import add_bundle_command
from edgesplit.cli_daemon import add_daemon_commands
from edgesplit.cli_keys import add_keys_commands
from edgesplit.cli_plan import add_plan_commands
from edgesplit.cli_split import add_split_commands
from edgesplit.runtime.engine import ENGINE_SETTINGS, EngineSettings
from edgesplit.runtime.errors import ConfigError, EdgesplitError
from edgesplit.runtime.hparams import DEFAULT_MAX_SEQ_LEN
from edgesplit.runtime.kernels import KERNELS
from edgesplit.runtime.models import DEFAULT_MODEL, KNOWN_MODELS

log = logging.getLogger("edgesplit.cli")



def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"known model name ({', '.join(sorted(KNOWN_MODELS))}), GGUF path or model store "
                        f"directory (default {DEFAULT_MODEL})")


def _add_engine(p: argparse.ArgumentParser, segments: bool = True) -> None:
    """Precision, accuracy, thread (and segment) flags shared by generate, eval and bench."""
    p.add_argument("--precision", default="q4", help="layer weight precision: q4, q8, f16, f32 (default q4)")
    p.add_argument("--head-precision", default="q8", help="embedding/head precision: q8, f16, f32 (default q8)")
    p.add_argument("--kv-precision", default="auto",
                   help="KV cache precision: auto (default: f16 where edgesplit's CachedAttention runs, "
                        "else f32), f32, f16 (half the memory), int8")
    p.add_argument("--accuracy-level", type=int, default=4,
                   help="accuracy level of the layers: 0 = fp32 compute (exact), "
                        "4 = int8 activations (default, faster)")
    p.add_argument("--outlier-channels", type=int, default=8,
                   help="at accuracy level 4: calibrated input channels per attention/FFN input kept in fp32 (default 8)")
    p.add_argument("--head-accuracy-level", type=int, default=4, help="accuracy level of the head (default 4)")
    p.add_argument("--head-outlier-channels", type=int, default=16,
                   help="at head accuracy level 4: head input channels kept in fp32 (default 16)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("--kernel", default="auto", choices=KERNELS,
                   help="q4 layers, the q8 head and attention: edgesplit's Q4Linear, Q8Linear and CachedAttention "
                        "operators (built here on first use) or onnxruntime's MatMulNBits and GroupQueryAttention; "
                        "auto (default): edgesplit's where they build")
    if segments:
        p.add_argument("--segments", type=int_list, default=None, metavar="A,B,...",
                       help="cut points of consecutive local segments, e.g. 0,12,30 (default: one segment)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging to stderr")
    parser = argparse.ArgumentParser(prog="edgesplit", parents=[common],
                                     description="Run an LLM split between a small device and a cloud worker.")
    parser.add_argument("--version", action="version", version=f"edgesplit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pull", parents=[common], help="download a known model's GGUF into the cache",
                       description=f"Known models: {', '.join(sorted(KNOWN_MODELS))}.")
    p.add_argument("name", metavar="NAME", help=f"one of: {', '.join(sorted(KNOWN_MODELS))}")
    p.add_argument("--force", action="store_true", help="download again even if a cached file exists")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("convert", parents=[common], help="convert a GGUF into a model store")
    p.add_argument("model", metavar="MODEL", help="known model name or GGUF path")
    p.add_argument("--out", required=True, metavar="DIR", help="model store directory to write")
    p.add_argument("--precisions", type=str_list, default=("q4", "q8", "f16", "f32"),
                   help="layer precisions to store (default q4,q8,f16,f32)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", parents=[common], help="generate text, streamed to stdout")
    _add_model(p)
    _add_engine(p)
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help=f"KV cache capacity in tokens (default {DEFAULT_MAX_SEQ_LEN} or the model context)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible draws)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("prompt", metavar="PROMPT")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", parents=[common], help="perplexity and agreement on a text file (JSON)")
    _add_model(p)
    p.add_argument("--text", required=True, metavar="FILE", help="text file to evaluate on")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of the file to use (default 4096)")
    p.add_argument("--window", type=int, default=512, help="tokens per teacher-forced window (default 512)")
    _add_engine(p)
    p.add_argument("--cut", type=int, default=None, metavar="K",
                   help="evaluate the split [0, K) + [K, L) with --codec at the cut (instead of --segments)")
    p.add_argument("--codec", default=None, metavar="C",
                   help="activation codec at the cut, e.g. int8 or 'ts+tabq:tau=40,budget=0.1' (with --cut)")
    p.add_argument("--bundle", default=None, metavar="DIR",
                   help="the split at this bundle's cut with its front in LiteRT (with --codec)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", parents=[common], help="prefill/decode speed (JSON)")
    _add_model(p)
    _add_engine(p, segments=False)
    p.add_argument("--vs", choices=["llama.cpp"], default=None, help="also run this reference on the same GGUF")
    p.add_argument("--runs", type=int, default=5, help="repetitions (default 5)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens decoded per run (default 128)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context (KV capacity) of both engines, llama.cpp's n_ctx (default: prompt + decode tokens)")
    p.add_argument("--segment", type=int_list, default=None, metavar="START,END",
                   help="instead of speed: load only layers [START, END), run the prompt, report memory")
    _add_flash_bench(p)
    p.add_argument("--op-profile", action="store_true",
                   help="instead of speed: ms per decode token by operator type (onnxruntime's node profiler, JSON)")
    g = p.add_argument_group("a bundle's LiteRT front against the onnxruntime front (--litert)")
    g.add_argument("--litert", action="store_true", help="equivalence, speed and size of --bundle's front (JSON)")
    g.add_argument("--bundle", default=None, metavar="DIR", help="with --litert: the bundle (edgesplit bundle)")
    g = p.add_argument_group("the cloud worker alone (--worker)")
    g.add_argument("--worker", action="store_true",
                   help="replay recorded cut activations from N concurrent sessions against one worker (JSON)")
    g.add_argument("--cut", type=int, default=15, help="with --worker: the cut (default 15)")
    g.add_argument("--concurrency", type=int_list, default=[1, 4, 8, 16, 32], metavar="N[,N...]",
                   help="with --worker: concurrent sessions per level (default 1,4,8,16,32)")
    g.add_argument("--duration-s", type=float, default=10.0, help="with --worker: seconds per level (default 10)")
    g.add_argument("--replicas", type=int_list, default=[], metavar="R[,R...]",
                   help="with --worker: measure a `cloud pool` of each size instead of one worker (Ray)")
    p.set_defaults(func=cmd_bench)
    add_split_commands(sub, common)
    add_plan_commands(sub, common)
    add_keys_commands(sub, common)
    add_daemon_commands(sub, common)
    add_bundle_command(sub, common)
    return parser


def cmd_pull(args: argparse.Namespace) -> int:
    from edgesplit.runtime.models import pull

    print(pull(args.name, progress=True, force=args.force))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from edgesplit.runtime.models import resolve_gguf
    from edgesplit.runtime.store import convert

    print(convert(resolve_gguf(args.model), args.out, precisions=args.precisions, progress=True))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from edgesplit.runtime.generate import check_fits, load_local, load_tokenizer, stream_generate
    from edgesplit.runtime.models import resolve_store
    from edgesplit.runtime.sampling import SamplingParams
    from edgesplit.runtime.store import ModelStore

    if args.system is not None and not args.chat:
        raise ConfigError("--system needs --chat")
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    engine = engine_settings_of(args)  # checked before the model loads
    store = ModelStore(resolve_store(args.model, (args.precision,)))
    max_seq_len = args.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, store.config.context_length)
    tok = load_tokenizer(store)
    ids = tok.encode(tok.chat_prompt(args.prompt, args.system) if args.chat else args.prompt)
    check_fits(len(ids), args.max_tokens, max_seq_len)  # before the engines load (seconds)
    engines = load_local(store, segments=args.segments, max_seq_len=max_seq_len, **engine.kwargs())
    last, ended_newline = None, True
    for last in stream_generate(engines, tok, ids, params, max_tokens=args.max_tokens, max_seq_len=max_seq_len):
        if last.text:
            sys.stdout.write(last.text)
            sys.stdout.flush()
            ended_newline = last.text.endswith("\n")
    if not ended_newline:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if last is not None:
        print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
              f"decode: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
              f"peak RSS {last.peak_rss_mb:.0f} MB | finish: {last.finish_reason}", file=sys.stderr)
    return 0


def engine_settings_of(args: argparse.Namespace) -> EngineSettings:
    """The engine flags (`_add_engine`) as checked EngineSettings."""
    return EngineSettings(**{k: getattr(args, k) for k in ENGINE_SETTINGS})


def cmd_eval(args: argparse.Namespace) -> int:
    from edgesplit.harness import evaluate

    segments = None if args.segments is None else tuple(args.segments)
    req = evaluate.EvalRequest(Path(args.text), args.tokens, args.window, args.model, segments, args.cut, args.codec,
                               engine_settings_of(args), None if args.bundle is None else Path(args.bundle))
    print(json.dumps(evaluate.run_eval(req)))
    return 0


def _add_flash_bench(p: argparse.ArgumentParser) -> None:
    """`bench --flash` flags (flash windowing, device/flash_bench.py)."""
    g = p.add_argument_group("flash windowing (--flash)")
    g.add_argument("--flash", action="store_true", help="bench the flash mechanisms instead (JSON line per mode)")
    g.add_argument("--mode", type=str_list, default=None, metavar="M[,M]",
                   help="embedding, stream and/or neurons, comma-separated (default all three)")
    g.add_argument("--budget-fraction", type=float, default=0.5,
                   help="memory budget as a fraction of the front's weight bytes (default 0.5)")
    g.add_argument("--budget-mb", type=float, default=None, help="memory budget in MB (instead of the fraction)")
    g.add_argument("--profile", default=None, metavar="D", help="device profile whose flash figures model the reads")
    g.add_argument("--text", default="../shared/data/wikitext-2/test.txt", metavar="FILE",
                   help="text for fidelity and bytes per token (default ../shared/data/wikitext-2/test.txt)")
    g.add_argument("--tokens", type=int, default=4096, help="tokens of --text (default 4096)")
    g.add_argument("--window", type=int, default=512, help="teacher-forced window (default 512)")
    g.add_argument("--stream-tokens", type=int, default=4096, help="tokens for the stream mode's fidelity")
    g.add_argument("--plot", default=None, metavar="PNG", help="neurons mode: write the fidelity/bytes plot here")


def cmd_bench(args: argparse.Namespace) -> int:
    if args.op_profile:
        from edgesplit.harness.op_profile import op_profile
        from edgesplit.runtime.models import resolve_store
        from edgesplit.runtime.store import ModelStore

        engine = engine_settings_of(args)
        store = ModelStore(resolve_store(args.model, (engine.precision,)))
        kwargs = {k: v for k, v in engine.kwargs().items() if k != "max_seq_len"}
        print(json.dumps(op_profile(store, args.prompt_tokens, args.decode_tokens, **kwargs)))
        return 0
    if args.litert:
        from edgesplit.harness.litert_bench import LiteRTBenchRequest, litert_bench
        from edgesplit.runtime.models import resolve_store
        from edgesplit.runtime.store import ModelStore

        if args.bundle is None:
            raise ConfigError("bench --litert needs --bundle DIR (edgesplit bundle --out DIR)")
        lreq = LiteRTBenchRequest(Path(args.bundle), prompt_tokens=args.prompt_tokens, runs=args.runs,
                                  threads=args.threads)
        print(json.dumps(litert_bench(ModelStore(resolve_store(args.model, precisions=("q4", "q8"))), lreq)))
        return 0
    if args.worker:
        from edgesplit.harness.worker_bench import WorkerBenchRequest, worker_bench
        from edgesplit.runtime.plan import PlanSettings, resolve_split

        wreq = WorkerBenchRequest(tuple(args.concurrency), args.duration_s, args.prompt_tokens,
                                  args.decode_tokens, args.threads, tuple(args.replicas))
        store, plan = resolve_split(args.model, PlanSettings(args.cut, max_seq_len=512))
        print(json.dumps(worker_bench(store, plan, wreq)))
        return 0
    if args.flash:
        from edgesplit.harness.flash_bench import MODES, FlashBenchRequest, run_flash_bench

        flash_req = FlashBenchRequest(args.model, tuple(args.mode) if args.mode else MODES, args.budget_fraction,
                                args.budget_mb, args.profile, Path(args.text), args.tokens, args.window,
                                args.stream_tokens, args.decode_tokens, args.plot, args.accuracy_level,
                                args.outlier_channels, args.kv_precision, args.threads)
        for row in run_flash_bench(flash_req):
            print(json.dumps(row), flush=True)
        return 0
    from edgesplit.harness import bench

    segment = None if args.segment is None else tuple(args.segment)
    req = bench.BenchRequest(args.model, args.vs, args.runs, args.prompt_tokens, args.decode_tokens, segment,
                             engine_settings_of(args), args.max_seq_len)
    print(json.dumps(bench.run_bench(req)))
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (so in-process callers can capture it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always wins
        pass


def _setup_logging(verbose: bool) -> None:
    """Log to stderr (stdout carries the generated text): INFO by default, DEBUG with -v."""
    logger = logging.getLogger("edgesplit")
    handler = next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        logger.addHandler(handler)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"))
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `edgesplit` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except EdgesplitError as exc:
        print(f"edgesplit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgesplit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `edgesplit generate ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
