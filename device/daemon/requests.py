"""OpenAI request bodies (chat and completions) parsed into typed `ApiRequest`s, checked field by field.

Every refusal is an `ApiError` with the HTTP status and the OpenAI error shape
(`{"error": {"message", "type", "code"}}`), naming the field and the value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from edgesplit.runtime.sampling import SamplingParams

MAX_STOPS = 4  # as OpenAI
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}


@dataclass(frozen=True)
class ApiRequest:
    """One generation asked of the API: a chat (`messages`) or a completion (`prompt`)."""

    kind: str  # "chat" or "completion"
    model: str
    messages: tuple[tuple[str, str], ...] = ()
    prompt: str = ""
    max_tokens: int | None = None  # None: up to the plan's capacity
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def _bad(message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code)


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
        raise _bad(f"'{key}' must be a number in [{low}, {high}], got {v!r}")
    return float(v)


def _int(body: dict, key: str, low: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise _bad(f"'{key}' must be an integer >= {low}, got {v!r}")
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise _bad(f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them, got {v!r}")
    return tuple(stops)


def _messages(body: dict) -> tuple[tuple[str, str], ...]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad(f"'messages' must be a non-empty list of {{role, content}} objects, got {msgs!r}"[:300],
                   "invalid_messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise _bad(f"'messages[{i}]' must be {{\"role\": one of {', '.join(ROLES)}, \"content\": a string}}, "
                       f"got {m!r}"[:300], "invalid_messages")
        out.append((m["role"], m["content"]))
    return tuple(out)


def parse_request(kind: str, body: Any, served_model: str) -> ApiRequest:
    """The typed request of a chat (`kind` 'chat') or completions body; ApiError when malformed."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", "invalid_json")
    model = body.get("model", served_model)
    if not isinstance(model, str) or not model:
        raise _bad(f"'model' must be a string, got {model!r}")
    if model != served_model:
        raise ApiError(404, f"model {model!r} does not exist; this daemon serves {served_model!r}",
                       "invalid_request_error", "model_not_found")
    n = body.get("n", 1)
    if n != 1:
        raise _bad(f"'n' must be 1 (one choice per request), got {n!r}", "unsupported_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be a boolean, got {stream!r}")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise _bad(f"'stream_options' must be an object, got {opts!r}")
    seed = _int(body, "seed", 0)
    params = SamplingParams(temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                            top_p=_number(body, "top_p", 1.0, 1e-9, 1.0), seed=seed)
    common = dict(model=model, max_tokens=_int(body, "max_tokens", 1) or _int(body, "max_completion_tokens", 1),
                  params=params, stop=_stop(body), stream=stream, include_usage=bool(opts.get("include_usage")))
    if kind == "chat":
        return ApiRequest("chat", messages=_messages(body), **common)  # type: ignore[arg-type]
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise _bad(f"'prompt' must be a non-empty string, got {prompt!r}"[:300], "invalid_prompt")
    return ApiRequest("completion", prompt=prompt, **common)  # type: ignore[arg-type]

