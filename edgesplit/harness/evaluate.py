"""`edgesplit eval`: the evaluation driver (resolves the model, reads the text, runs one comparison)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgesplit.harness.evaluate_split import evaluate_split
from edgesplit.runtime.codec import parse_codec
from edgesplit.runtime.engine import EngineSettings
from edgesplit.runtime.errors import ConfigError, EdgesplitError
from edgesplit.runtime.evaluate import evaluate, text_tokens
from edgesplit.runtime.generate import load_tokenizer
from edgesplit.runtime.models import DEFAULT_MODEL, resolve_gguf, resolve_store
from edgesplit.runtime.reference import ReferenceModel
from edgesplit.runtime.store import ModelStore


@dataclass(frozen=True)
class EvalRequest:
    """One evaluation: the first `tokens` tokens of `text`, teacher-forced in windows of `window`,
    against the fp32 reference; one engine, chained `segments`, or the split at `cut` with `codec`.
    Checked when made (a bad codec fails before the model loads)."""

    text: Path
    tokens: int = 4096
    window: int = 512
    model: str = DEFAULT_MODEL
    segments: tuple[int, ...] | None = None
    cut: int | None = None
    codec: str | None = None
    engine: EngineSettings = field(default_factory=EngineSettings)
    bundle: Path | None = None  # the front from this bundle, in LiteRT (the split at its cut)

    def __post_init__(self) -> None:
        if self.bundle is None and (self.cut is None) != (self.codec is None):
            raise ConfigError("--cut and --codec go together (the codec runs at the cut)")
        if self.bundle is not None and self.codec is None:
            raise ConfigError("--bundle evaluates the split at the bundle's cut: give --codec too")
        if self.cut is not None and self.segments is not None:
            raise ConfigError("--cut replaces --segments; give one or the other")
        if self.codec is not None:
            parse_codec(self.codec)
        for name in ("tokens", "window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise ConfigError(f"{name} must be an integer >= 2, got {v!r}")


def run_eval(req: EvalRequest) -> dict:
    """Resolve the model, store and tokenizer, evaluate the text file; one JSON-able dict."""
    text = Path(req.text)
    if not text.is_file():
        raise EdgesplitError(f"{text}: text file not found")
    store = ModelStore(resolve_store(req.model, precisions=(req.engine.precision,)))
    tokens = text_tokens(text, load_tokenizer(store), req.tokens)
    reference = ReferenceModel.from_gguf(resolve_gguf(req.model))
    kwargs = req.engine.kwargs()
    if req.bundle is not None:
        from edgesplit.device.bundle.bundle import Bundle

        bundle = Bundle.open(req.bundle)
        if req.cut is not None and req.cut != bundle.plan.cut:
            raise ConfigError(f"--cut {req.cut}: the bundle {req.bundle} is cut at {bundle.plan.cut}")
        out = evaluate_split(store, reference, tokens, cut=bundle.plan.cut, codec=req.codec, window=req.window,
                             front=bundle.load_front(req.engine.threads), **kwargs)
        out.update(front="litert", bundle=str(req.bundle), bundle_weights=bundle.front["weights"])
    elif req.cut is not None and req.codec is not None:
        out = evaluate_split(store, reference, tokens, cut=req.cut, codec=req.codec, window=req.window, **kwargs)
    else:
        segments = None if req.segments is None else list(req.segments)
        out = evaluate(store, reference, tokens, window=req.window, segments=segments, **kwargs)
    out["text"] = str(text)
    return out
