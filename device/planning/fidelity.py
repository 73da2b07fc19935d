"""Fidelity and traffic of a setting, from the measured table (device/fidelity_data.py).

Only whole-model runs per precision and splits with a codec at cuts 5/15/25 are measured, so a
setting's figure is composed, and says how (`basis`):

- engine: top-1 of the uniform precision row; a front/back precision mix is interpolated by the
  fraction of layers at each precision: top1(back) + cut/L * (top1(front) - top1(back)); a KV
  precision without its own row for that precision adds the q4 row's KV difference;
- codec: minus the codec's measured loss `max(0, top1_lossless - top1)` at the cut, linear in the
  cut between the measured cuts (held constant beyond them); perplexity multiplied likewise by
  ppl / ppl_lossless. f32 is lossless by construction.
Bytes of fixed-size codecs (f32, f16, int8) come from `codec.encoded_nbytes` on a row; data-dependent
codecs (tabq, ecq) take the measured bytes, interpolated over the cut the same way; an adaptive
codec (`adapt=1`) adds the prompt ids its prefill carries to the bytes per prompt token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from edgesplit.runtime.codec import encoded_nbytes, parse_codec

from edgesplit.device.planning.fidelity_data import CODEC_ROWS, ENGINE_ROWS, CodecRow, EngineRow

FIXED_SIZE = ("f32", "f16", "int8")
LOSSLESS = "f32"
PROMPT_ROWS = 512  # prompt blob size used for bytes per prompt token of fixed codecs
PROMPT_ID_BYTES = 4.0  # per prompt token: the prompt ids (int32) an adapt=1 codec's prefill sends


@functools.lru_cache(maxsize=64)
def fixed_codec_bytes(codec: str, d_model: int) -> tuple[float, float]:
    """(bytes of one encoded row, bytes per row of a PROMPT_ROWS-row blob) of a fixed-size codec."""
    spec = parse_codec(codec)
    row = encoded_nbytes(np.zeros((1, d_model), np.float32), spec)
    prompt = encoded_nbytes(np.zeros((PROMPT_ROWS, d_model), np.float32), spec) / PROMPT_ROWS
    return float(row), float(prompt)


@dataclass(frozen=True)
class Fidelity:
    """Estimated top-1 agreement with the fp32 reference and perplexity ratio (ppl / ppl_ref)."""

    top1: float
    ppl_ratio: float
    basis: str  # which rows and rules gave it


@dataclass(frozen=True)
class FidelityTable:
    """The rows the planner uses (defaults: the measured table)."""

    engine: tuple[EngineRow, ...] = ENGINE_ROWS
    codec: tuple[CodecRow, ...] = CODEC_ROWS

    def codecs(self) -> tuple[str, ...]:
        """Codec settings with figures: f32 plus every codec measured at some cut."""
        return (LOSSLESS,) + tuple(sorted({r.codec for r in self.codec} - {LOSSLESS}))

    def _engine(self, precision: str, kv: str) -> EngineRow | None:
        return next((r for r in self.engine if r.precision == precision and r.kv_precision == kv), None)

    def engine_fidelity(self, precision: str, kv: str) -> tuple[float, float, str] | None:
        """(top1, ppl ratio, basis) of a uniform precision and KV precision, or None if unknown."""
        row = self._engine(precision, kv)
        if row is not None:
            return row.top1, row.ppl / row.ppl_ref, f"{precision}/{kv} measured"
        base, q4, q4kv = self._engine(precision, "f32"), self._engine("q4", "f32"), self._engine("q4", kv)
        if base is None or q4 is None or q4kv is None:
            return None
        kv_ppl_ratio = (q4kv.ppl / q4kv.ppl_ref) / (q4.ppl / q4.ppl_ref)
        return (base.top1 + q4kv.top1 - q4.top1, base.ppl / base.ppl_ref * kv_ppl_ratio,
                f"{precision}/f32 + (q4/{kv} - q4/f32)")

    def _codec_curve(self, codec: str, attr) -> tuple[np.ndarray, np.ndarray] | None:
        rows = sorted((r for r in self.codec if r.codec == codec), key=lambda r: r.cut)
        if not rows:
            return None
        return np.array([r.cut for r in rows], float), np.array([attr(r) for r in rows], float)

    def estimate(self, cut: int, n_layers: int, front: str, back: str, kv: str, codec: str) -> Fidelity | None:
        """The composed estimate for a setting (module docstring), or None when a part is unmeasured."""
        f, b = self.engine_fidelity(front, kv), self.engine_fidelity(back, kv)
        if f is None or b is None:
            return None
        w = cut / n_layers  # fraction of layers at the front precision
        top1, ppl = b[0] + w * (f[0] - b[0]), b[1] + w * (f[1] - b[1])
        basis = f[2] if front == back else f"front {f[2]} x {cut}/{n_layers} + back {b[2]}"
        if codec != LOSSLESS:
            loss = self._codec_curve(codec, lambda r: max(0.0, r.top1_lossless - r.top1))
            ratio = self._codec_curve(codec, lambda r: r.ppl / r.ppl_lossless)
            if loss is None or ratio is None:
                return None
            top1 -= float(np.interp(cut, loss[0], loss[1]))
            ppl *= float(np.interp(cut, ratio[0], ratio[1]))
            basis += f"; codec loss at cut {cut} from cuts {loss[0].astype(int).tolist()}"
        return Fidelity(top1, ppl, basis)

    def codec_bytes(self, codec: str, cut: int, d_model: int) -> tuple[float, float] | None:
        """(bytes per decode token, bytes per prompt token) of `codec` at `cut`, or None if unknown."""
        if parse_codec(codec).name in FIXED_SIZE:
            return fixed_codec_bytes(codec, d_model)
        per_token = self._codec_curve(codec, lambda r: r.bytes_per_token)
        per_prompt = self._codec_curve(codec, lambda r: r.bytes_per_prompt_token)
        if per_token is None:
            return None
        assert per_prompt is not None  # the same rows as per_token
        ids = PROMPT_ID_BYTES if parse_codec(codec).adapt else 0.0  # an adaptive codec's prefill carries the ids
        return (float(np.interp(cut, per_token[0], per_token[1])),
                float(np.interp(cut, per_prompt[0], per_prompt[1])) + ids)
