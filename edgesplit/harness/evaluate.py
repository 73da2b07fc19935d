"""`edgesplit eval`: the evaluation driver (resolves the model, reads the text, runs one comparison)."""

from __future__ import annotations

from pathlib import Path

from edgesplit.harness.evaluate_split import evaluate_split
from edgesplit.runtime.codec import parse_codec
from edgesplit.runtime.engine import engine_kwargs_of
from edgesplit.runtime.errors import ConfigError, EdgesplitError
from edgesplit.runtime.evaluate import evaluate, text_tokens
from edgesplit.runtime.generate import load_tokenizer
from edgesplit.runtime.models import resolve_gguf, resolve_store
from edgesplit.runtime.reference import ReferenceModel
from edgesplit.runtime.store import ModelStore


def cli_eval(args) -> dict:
    """`edgesplit eval`: resolve model, store and tokenizer from `args`, evaluate the text file."""

    cut, codec = getattr(args, "cut", None), getattr(args, "codec", None)
    if (cut is None) != (codec is None):
        raise ConfigError("--cut and --codec go together (the codec runs at the cut)")
    if cut is not None and getattr(args, "segments", None) is not None:
        raise ConfigError("--cut replaces --segments; give one or the other")
    if codec is not None:
        parse_codec(codec)  # a bad setting fails before the model loads
    text = Path(args.text)
    if not text.is_file():
        raise EdgesplitError(f"{text}: text file not found")
    store = ModelStore(resolve_store(args.model, precisions=(args.precision,)))
    tokens = text_tokens(text, load_tokenizer(store), args.tokens)
    reference = ReferenceModel.from_gguf(resolve_gguf(args.model))
    kwargs = engine_kwargs_of(args)
    if cut is not None or codec is not None:
        out = evaluate_split(store, reference, tokens, cut=cut, codec=codec, window=args.window, **kwargs)
    else:
        out = evaluate(store, reference, tokens, window=args.window, segments=args.segments, **kwargs)
    out["text"] = str(text)
    return out
