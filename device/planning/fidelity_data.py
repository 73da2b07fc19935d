"""Measured fidelity of settings on SmolLM2-135M-Instruct (Q4_1 GGUF): the planner's fidelity table.

Every figure is from `edgesplit eval` on `../shared/data/wikitext-2/test.txt`, windows of 512,
teacher-forced, against the fp32 reference (the GGUF dequantized, numpy). `top1` is the top-1
agreement with that reference; `ppl` the perplexity. Default engine settings unless the row says
otherwise (q8 head, accuracy level 4 with 8/16 outlier channels, 2 threads).

ENGINE_ROWS: one engine for the whole model (no cut, no codec), per layer precision and KV precision.
CODEC_ROWS: the split at `cut` with the codec in the loop (q4 layers, f32 KV); `top1_lossless` and
`ppl_lossless` are the same split with the lossless f32 codec; bytes per decode token (one row
encoded alone) and per prompt token (a 512-token window as one blob).
"""

from __future__ import annotations

from dataclasses import dataclass

TEXT = "../shared/data/wikitext-2/test.txt"


@dataclass(frozen=True)
class EngineRow:
    """Whole-model fidelity of one layer precision and KV precision."""

    precision: str
    kv_precision: str
    top1: float
    ppl: float
    ppl_ref: float
    tokens: int  # tokens scored
    command: str


@dataclass(frozen=True)
class CodecRow:
    """The split at `cut` with `codec` at the cut (q4 layers, f32 KV)."""

    cut: int
    codec: str
    top1: float
    top1_lossless: float
    ppl: float
    ppl_lossless: float
    bytes_per_token: float
    bytes_per_prompt_token: float
    tokens: int = 4088
    command: str = ""

    def __post_init__(self):
        if not self.command:
            object.__setattr__(self, "command", f"edgesplit eval --text {TEXT} --tokens 4096 --cut {self.cut} "
                                                f"--codec '{self.codec}'")


def _eval(args: str, tokens: int = 2048) -> str:
    return f"edgesplit eval --text {TEXT} --tokens {tokens}" + (f" {args}" if args else "")


ENGINE_ROWS = (
    # 2048 tokens (2044 scored), measured again on 2026-12-01 with the default kernel (q4 layers on
    # Q4Linear with CachedAttention for f32/f16 caches; the q4 rows of 2026-11-23, on MatMulNBits,
    # were 0.9760 f32 and 0.9535 int8). No q8 row with an f16 cache: q8 layers run on
    # onnxruntime's operators, whose attention converts an f16 cache each step (a slow path the
    # latency model does not know), so the planner does not offer it.
    EngineRow("f32", "f32", 0.9941, 25.484, 25.494, 2044, _eval("--precision f32")),
    EngineRow("q4", "f32", 0.9780, 25.500, 25.494, 2044, _eval("")),
    EngineRow("q4", "f16", 0.9809, 25.485, 25.494, 2044, _eval("--kv-precision f16")),
    EngineRow("q4", "int8", 0.9486, 25.666, 25.494, 2044, _eval("--kv-precision int8")),
    EngineRow("q8", "f32", 0.9706, 25.470, 25.494, 2044, _eval("--precision q8")),
    EngineRow("q8", "int8", 0.9501, 25.762, 25.494, 2044, _eval("--precision q8 --kv-precision int8")),
)

# From the codec table run of issue 3 (README "Codecs on the real model"), 4096 tokens (4088 scored).
CODEC_ROWS = (
    CodecRow(5, "f16", 0.9790, 0.9758, 27.628, 27.628, 1164, 1152.0),
    CodecRow(5, "int8", 0.9660, 0.9758, 27.672, 27.628, 592, 580.0),
    CodecRow(5, "ts+tabq:bits=4,k=6", 0.8860, 0.9758, 28.715, 27.628, 321, 305.2),
    CodecRow(5, "ts+tabq:budget=0.1,tau=40,rotate=1", 0.9579, 0.9758, 27.724, 27.628, 386, 370.4),
    CodecRow(5, "ts+tabq:budget=0.05,tau=40,rotate=1", 0.9702, 0.9758, 27.624, 27.628, 457, 441.9),
    CodecRow(15, "f16", 0.9799, 0.9790, 27.639, 27.617, 1164, 1152.0),
    CodecRow(15, "int8", 0.9428, 0.9790, 27.944, 27.617, 592, 580.0),
    CodecRow(15, "ts+tabq:bits=4,k=6", 0.8679, 0.9790, 29.028, 27.617, 320, 304.4),
    CodecRow(15, "ts+tabq:budget=0.1,tau=40,rotate=1", 0.9621, 0.9790, 27.728, 27.617, 394, 378.2),
    CodecRow(15, "ts+tabq:budget=0.05,tau=40,rotate=1", 0.9692, 0.9790, 27.646, 27.617, 465, 448.8),
    CodecRow(25, "f16", 0.9768, 0.9787, 27.613, 27.621, 1164, 1152.0),
    CodecRow(25, "int8", 0.9648, 0.9787, 27.713, 27.621, 592, 580.0),
    CodecRow(25, "ts+tabq:bits=4,k=6", 0.8843, 0.9787, 29.079, 27.621, 319, 303.4),
    CodecRow(25, "ts+tabq:budget=0.1,tau=40,rotate=1", 0.9653, 0.9787, 27.707, 27.621, 413, 396.7),
    CodecRow(25, "ts+tabq:budget=0.05,tau=40,rotate=1", 0.9728, 0.9787, 27.657, 27.621, 483, 467.0),
    # ecq (the calibrated range-coded codec) with and without its trellis mode, same command,
    # default engine (level 4), measured 2026-12-01 with today's kernels (Q4Linear, CachedAttention)
    CodecRow(5, "ecq:step=0.15", 0.9648, 0.9755, 27.572, 27.599, 289, 275.6),
    CodecRow(5, "ecq:step=0.15,trellis=1", 0.9606, 0.9755, 27.626, 27.599, 289, 276.0),
    CodecRow(5, "ecq:step=0.2", 0.9547, 0.9755, 27.757, 27.599, 259, 246.2),
    CodecRow(5, "ecq:step=0.2,trellis=1", 0.9623, 0.9755, 27.726, 27.599, 260, 246.7),
    CodecRow(15, "ecq:step=0.15", 0.9653, 0.9755, 27.604, 27.599, 330, 316.5),
    CodecRow(15, "ecq:step=0.15,trellis=1", 0.9719, 0.9755, 27.588, 27.599, 330, 316.6),
    CodecRow(15, "ecq:step=0.2", 0.9614, 0.9755, 27.607, 27.599, 300, 286.9),
    CodecRow(15, "ecq:step=0.2,trellis=1", 0.9662, 0.9755, 27.746, 27.599, 300, 287.2),
    CodecRow(25, "ecq:step=0.15", 0.9660, 0.9755, 27.717, 27.599, 365, 352.3),
    CodecRow(25, "ecq:step=0.15,trellis=1", 0.9716, 0.9755, 27.641, 27.599, 365, 352.3),
    CodecRow(25, "ecq:step=0.2", 0.9682, 0.9755, 27.663, 27.599, 336, 322.5),
    CodecRow(25, "ecq:step=0.2,trellis=1", 0.9677, 0.9755, 27.654, 27.599, 336, 322.6),
    # ecq's adaptive session mode (codec_stream.py), same command, default engine, measured
    # 2026-12-02 (the lossless split that day: 0.9799, ppl 27.634); a window is one session, its
    # rows coded one at a time; bytes per prompt token are the blob's (the planner adds the ids)
    CodecRow(5, "ecq:step=0.15,trellis=1,adapt=1", 0.9660, 0.9799, 27.617, 27.634, 246, 240.3),
    CodecRow(15, "ecq:step=0.15,trellis=1,adapt=1", 0.9684, 0.9799, 27.649, 27.634, 297, 291.4),
    CodecRow(25, "ecq:step=0.15,trellis=1,adapt=1", 0.9746, 0.9799, 27.658, 27.634, 323, 316.6),
    CodecRow(5, "ecq:step=0.2,trellis=1,adapt=1", 0.9594, 0.9799, 27.730, 27.634, 218, 211.8),
    CodecRow(15, "ecq:step=0.2,trellis=1,adapt=1", 0.9662, 0.9799, 27.631, 27.634, 268, 262.1),
    CodecRow(25, "ecq:step=0.2,trellis=1,adapt=1", 0.9648, 0.9799, 27.667, 27.634, 293, 287.1),
)
