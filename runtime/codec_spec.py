"""Codec settings: `CodecSpec`, one validated setting, and its CLI form `name[:key=value,...]`
(what each name and key means: codec.py's docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import codec_quant as cq
from .errors import ConfigError

NAMES = ("f32", "f16", "int8", "tabq", "ts+tabq", "ecq")
_KEYS = {"bits": "bits", "budget": "error_budget", "tau": "tau", "k": "k_sigma",
         "channels": "outlier_channels", "rotate": "rotate", "step": "step", "trellis": "trellis", "adapt": "adapt"}
_FLAGS = ("rotate", "trellis", "adapt")  # keys whose values are 0 or 1


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


@dataclass(frozen=True)
class CodecSpec:
    """One codec setting; validated on construction (ConfigError naming the field)."""

    name: str
    bits: int | None = None
    error_budget: float | None = None
    tau: float | None = None
    k_sigma: float | None = None
    outlier_channels: tuple[int, ...] = field(default=())
    rotate: bool = False
    step: float | None = None
    trellis: bool = False  # ecq only
    adapt: bool = False  # ecq only: a session codec (codec_stream.py), through a Stream

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ConfigError(f"codec name {self.name!r} unknown; expected one of {', '.join(NAMES)}")
        set_fields = [k for k, a in _KEYS.items() if getattr(self, a) not in (None, (), False)]
        if self.name in ("f32", "f16", "int8"):
            if set_fields:
                raise ConfigError(f"codec {self.name!r} takes no options; got {', '.join(set_fields)}")
            return
        if self.name == "ecq":
            self._check_ecq(set_fields)
            return
        if self.step is not None or self.trellis or self.adapt:
            raise ConfigError(f"codec {self.name!r} takes no step, trellis or adapt (those are 'ecq')")
        if (self.bits is None) == (self.error_budget is None):
            raise ConfigError(f"codec {self.name!r}: give exactly one of bits (fixed width) or budget")
        if self.bits is not None and (isinstance(self.bits, bool) or not isinstance(self.bits, int)
                                      or not cq.MIN_BITS <= self.bits <= cq.MAX_BITS):
            raise ConfigError(f"codec field bits={self.bits!r} must be an integer in 2..8")
        for key, attr, hi in (("budget", "error_budget", 1.0), ("tau", "tau", math.inf),
                              ("k", "k_sigma", math.inf)):
            v = getattr(self, attr)
            if v is not None:
                if not isinstance(v, (int, float, np.integer, np.floating)) or not (0 < v < hi) or math.isnan(v):
                    raise ConfigError(f"codec field {key}={v!r} must be a number in (0, {hi})")
                object.__setattr__(self, attr, float(v))
        if self.name == "ts+tabq" and (self.tau is None) == (self.k_sigma is None):
            raise ConfigError("codec 'ts+tabq': give exactly one of tau (fixed threshold) or k (sigmas)")
        if self.name == "tabq" and (self.tau is not None or self.k_sigma is not None):
            raise ConfigError("codec 'tabq' takes no tau/k (threshold splitting is 'ts+tabq')")
        chans = tuple(self.outlier_channels)
        if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in chans) \
                or len(set(chans)) != len(chans):
            raise ConfigError(f"codec field channels={chans!r} must be distinct non-negative integers")
        object.__setattr__(self, "outlier_channels", tuple(sorted(int(c) for c in chans)))
        self._flag("rotate")

    def _flag(self, key: str) -> None:
        """Check that flag field `key` (one of _FLAGS) is a bool and store it as Python's bool."""
        v = getattr(self, key)
        if not isinstance(v, (bool, np.bool_)):
            raise ConfigError(f"codec field {key}={v!r} must be a bool")
        object.__setattr__(self, key, bool(v))

    def _check_ecq(self, set_fields: list[str]) -> None:
        others = [k for k in set_fields if k not in ("step", "trellis", "adapt")]
        if others or self.step is None:  # (a step of 0 is "set": refused below, not as missing)
            raise ConfigError(f"codec 'ecq' takes step=S and optionally trellis=1, adapt=1; "
                              f"got {', '.join(others) or 'no step'}")
        self._flag("trellis")
        self._flag("adapt")
        v = self.step
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                or not 0.001 <= v <= 100:
            raise ConfigError(f"codec field step={v!r} must be a number in [0.001, 100]")
        object.__setattr__(self, "step", float(v))

    def __str__(self) -> str:
        parts = []
        if self.bits is not None:
            parts.append(f"bits={self.bits}")
        for key, attr in (("budget", "error_budget"), ("tau", "tau"), ("k", "k_sigma"), ("step", "step")):
            if getattr(self, attr) is not None:
                parts.append(f"{key}={_fmt(getattr(self, attr))}")
        if self.outlier_channels:
            parts.append("channels=" + "/".join(map(str, self.outlier_channels)))
        parts += [f"{key}=1" for key in _FLAGS if getattr(self, key)]
        return self.name + (":" + ",".join(parts) if parts else "")


def parse_codec(text: str) -> CodecSpec:
    """Parse a CLI codec setting such as `int8`, `tabq:budget=0.02` or `ts+tabq:k=6,budget=0.02,rotate=1`."""
    name, _, opts = text.strip().partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in opts.split(","))) if opts else ():
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key not in _KEYS:
            raise ConfigError(f"codec {text!r}: unknown field {key!r}; expected one of {', '.join(_KEYS)}")
        if not eq or not value:
            raise ConfigError(f"codec {text!r}: field {key!r} has no value (write {key}=VALUE)")
        if _KEYS[key] in kwargs:
            raise ConfigError(f"codec {text!r}: field {key!r} given twice")
        parsed: int | float | bool | tuple[int, ...]
        try:
            if key == "bits":
                parsed = int(value)
            elif key == "channels":
                parsed = tuple(int(c) for c in value.split("/"))
            elif key in _FLAGS:
                parsed = {"0": False, "1": True}[value]
            else:
                parsed = float(value)
        except (ValueError, KeyError):
            raise ConfigError(f"codec {text!r}: field {key!r} has a bad value {value!r}") from None
        kwargs[_KEYS[key]] = parsed
    return CodecSpec(name.strip(), **kwargs)
