"""Cost models of a split setting: device memory, per-token latency and time to first token.

Pure functions over profiles (no I/O, no model): the planner calls them for every candidate.

Memory (MB, device process peak RSS):
    runtime overhead + embedding + cut x resident MB per layer at the front precision
    + cut x KV bytes per token per layer x tokens held + workspace MB per prompt token x prompt
    (at most PREFILL_CHUNK positions: longer prompts run in chunks).
"Resident per layer" is measured RSS (onnxruntime's packed weights, wider than the shards), not
the shard size: that is what the device pays.

Latency (ms per decode token at a context of `context` tokens):
    device compute  = decode factor x (step overhead + embedding + cut x layer decode ms(context))
    encode          = codec ms (encode + decode of one row) x device prefill factor (CPU-bound)
    uplink/downlink = frame bytes / bandwidth, each way; + RTT
    cloud compute   = max(step floor, cloud factor x (step overhead + head + back layers x ms))
    overhead        = the measured split loop overhead (frames, sockets, detokenizing)
`ms_per_token` is the typical (median) token: a retransmission hits a token only now and then
(p_token = 1 - (1 - loss)^2, < 50% for every profile here) and so does not move the median, which
is what `simulate` and `sweep` report. `cloud_usd_per_mtok` prices the cloud compute per token at the cloud profile's price per hour.
`mean_ms_per_token` adds the expected retransmissions
(p / (1 - p) lost attempts per frame, each costing RTO + serialization).
Time to first token: the same with prefill figures for a prompt of `prompt_tokens`.

Front flash option (`Setting.flash`, see `front_flash`): 'resident' (everything in DRAM),
'embedding' (embedding rows read from flash: the table's MB become an LRU row cache, each decode
token pays the miss rate x one row read) or 'stream' (embedding on flash too, plus as many q4
layers resident as fit the memory limit, the others read each token, two at a time in DRAM; token
time = max(modelled reads, compute) with streamed layers at their measured compute factor). Flash
reads are modelled from the profile's flash figures (`FlashModel.from_profile`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgesplit.profiles.cloud import CloudProfile
from edgesplit.profiles.device import DeviceProfile, LayerFigures, MeasuredFigures
from edgesplit.profiles.network import NetworkProfile
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.hparams import PREFILL_CHUNK
from edgesplit.runtime.plan import FRONT_FLASH
from edgesplit.transport.link import rto_ms, serialization_ms

from edgesplit.device.planning.flash_model import (EMBEDDING_CACHE_ROWS, EMBEDDING_MISS_RATE, PACKED_BYTES_PER_SHARD_BYTE, STREAM_WINDOW_LAYERS,
                          STREAM_PRECISIONS, STREAMED_LAYER_COMPUTE_FACTOR, FlashModel, embedding_figures,
                          q8_row_bytes, stream_figures, stream_plan)

FLASH_OPTIONS = FRONT_FLASH  # the front flash options the runtime runs (runtime/plan.py)
MB = 10**6  # bytes: profile memory figures are in MB = 10^6 bytes


@dataclass(frozen=True)
class Setting:
    """One candidate: the plan's decision variables (head precision and accuracy level fixed)."""

    cut: int
    front_precision: str
    back_precision: str
    kv_precision: str
    codec: str
    max_seq_len: int
    flash: str = "resident"  # front flash option, one of FLASH_OPTIONS (the Plan's front_flash)


@dataclass(frozen=True)
class Costs:
    """Predicted figures of one setting (units in the names)."""

    device_memory_mb: float
    ms_per_token: float  # typical (median) decode token
    mean_ms_per_token: float  # with the expected retransmissions
    ttft_ms: float
    breakdown_ms: dict  # per decode token: device_compute, encode, link, cloud_compute, overhead
    flash: "FrontFlash | None" = None  # what the front's flash option costs (None: no details)
    cloud_usd_per_mtok: float = 0.0  # cloud compute per decode token x the worker's price, USD per 10^6 tokens


@dataclass(frozen=True)
class FrontFlash:
    """The device front under one flash option: its DRAM and its time per decode token."""

    option: str
    front_mb: float  # embedding (or its row cache) + resident layers + read buffers, MB
    decode_ms: float  # device compute + modelled flash reads per decode token (scaled), ms
    prefill_io_ms: float  # modelled flash reads added to the time to first token, ms
    streamed_layers: int
    io_bytes_per_token: float  # bytes read from flash per decode token
    io_ms_per_token: float  # modelled read time per decode token (overlapped with compute for 'stream')


def layer_decode_ms(lf: LayerFigures, contexts: tuple[int, ...], context: int) -> float:
    """One layer's decode ms at `context` KV positions: linear in the context between (and beyond
    the last two of) the measured points; clamped below at the first point."""
    xs, ys = np.asarray(contexts, float), np.asarray(lf.decode_ms, float)
    if context <= xs[0] or len(xs) == 1:
        return float(ys[0])
    if context <= xs[-1]:
        return float(np.interp(context, xs, ys))
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return float(ys[-1] + slope * (context - xs[-1]))


def running_memory_mb(fig: MeasuredFigures, cut: int, front_precision: str, kv_precision: str,
                      tokens: int, prompt_tokens: int = 0) -> float:
    """Peak RSS (MB) of a device process running [0, cut) with `tokens` positions of KV in use."""
    kv_mb = cut * fig.kv_bytes_per_token_per_layer[kv_precision] * tokens / MB
    return (fig.runtime_overhead_mb + fig.embedding_mb + cut * fig.layer(front_precision).resident_mb
            + kv_mb + fig.workspace_mb_per_prompt_token * min(prompt_tokens, PREFILL_CHUNK))


def opening_memory_mb(fig: MeasuredFigures, cut: int) -> float:
    """Peak RSS (MB) of a device process while it opens a front of `cut` layers."""
    return fig.open_overhead_mb + cut * fig.open_mb_per_layer


def device_memory_mb(fig: MeasuredFigures, cut: int, front_precision: str, kv_precision: str,
                     tokens: int, prompt_tokens: int = 0) -> float:
    """Peak RSS (MB) of a device process holding [0, cut) with `tokens` positions of KV in use:
    the larger of its peak while opening the front and while running it."""
    return max(opening_memory_mb(fig, cut),
               running_memory_mb(fig, cut, front_precision, kv_precision, tokens, prompt_tokens))


def link_ms(net: NetworkProfile, up_bytes: float, down_bytes: float) -> float:
    """ms for one request/reply over the link without losses: serialization both ways and the RTT."""
    return serialization_ms(up_bytes, net.uplink_mbps) + serialization_ms(down_bytes, net.downlink_mbps) + net.rtt_ms


def retransmit_ms(net: NetworkProfile, up_bytes: float, down_bytes: float) -> float:
    """Expected ms of retransmissions for one request/reply: p / (1 - p) lost attempts per frame,
    each costing an RTO and the frame's serialization again."""
    p = net.loss_pct / 100.0
    ser = serialization_ms(up_bytes, net.uplink_mbps) + serialization_ms(down_bytes, net.downlink_mbps)
    return p / (1.0 - p) * (2 * rto_ms(net) + ser)


def device_decode_ms(dev: DeviceProfile, s: Setting, context: int) -> float:
    """The device front's compute for one decode token (ms)."""
    f = dev.figures
    per_layer = layer_decode_ms(f.layer(s.front_precision), f.context_tokens, context)
    return dev.decode_time_factor * (f.step_overhead_ms + f.embed_ms + s.cut * per_layer)


def front_flash(dev: DeviceProfile, s: Setting, context: int, prompt_tokens: int,
                budget_mb: float, other_mb: float) -> FrontFlash | None:
    """The front under `s.flash`; `budget_mb`: the memory limit, `other_mb`: what the device holds
    besides the front (runtime, KV, workspace; stream fits its resident layers into the rest).
    None when the option does not apply (stream of a precision flash does not hold, or with every
    layer resident: that is 'embedding')."""
    if s.flash not in FLASH_OPTIONS:
        raise ConfigError(f"flash option {s.flash!r} is not one of {', '.join(FLASH_OPTIONS)}")
    f = dev.figures
    lf = f.layer(s.front_precision)
    per_layer = layer_decode_ms(lf, f.context_tokens, context)
    base = f.step_overhead_ms + f.embed_ms
    compute = dev.decode_time_factor * (base + s.cut * per_layer)
    if s.flash == "resident":
        return FrontFlash("resident", f.embedding_mb + s.cut * lf.resident_mb, compute, 0.0, 0, 0.0, 0.0)
    flash = FlashModel.from_profile(dev)
    emb = embedding_figures(int(f.embedding_mb * MB), q8_row_bytes(f.d_model), EMBEDDING_CACHE_ROWS,
                            EMBEDDING_MISS_RATE, flash)
    cache_mb, emb_ms = emb["resident_bytes"] / MB, emb["io_ms_per_token"]
    if s.flash == "embedding":
        return FrontFlash("embedding", cache_mb + s.cut * lf.resident_mb, compute + emb_ms, prompt_tokens * emb_ms,
                          0, emb["bytes_per_token"], emb_ms)
    return _stream(dev, s, per_layer, base, flash, emb, prompt_tokens, budget_mb, other_mb)


def _stream(dev: DeviceProfile, s: Setting, per_layer: float, base: float, flash: FlashModel, emb: dict,
            prompt_tokens: int, budget_mb: float, other_mb: float) -> FrontFlash | None:
    """Layer streaming of [0, cut) at the budget (embedding rows on flash too)."""
    lf = dev.figures.layer(s.front_precision)
    if s.front_precision not in STREAM_PRECISIONS:
        return None
    region = int(lf.shard_bytes * PACKED_BYTES_PER_SHARD_BYTE)  # bytes one streamed layer reads
    fixed_mb = emb["resident_bytes"] / MB + STREAM_WINDOW_LAYERS * region / MB
    try:  # resident layers chosen by their DRAM (RSS) size
        resident = stream_plan([int(lf.resident_mb * MB)] * s.cut, int((other_mb + fixed_mb) * MB),
                               int(budget_mb * MB))
    except ConfigError:  # not even the buffers fit: every layer streamed, the memory check refuses it
        resident = set()
    if len(resident) == s.cut:
        return None
    streamed = s.cut - len(resident)
    compute = dev.decode_time_factor * (base + (len(resident) + streamed * STREAMED_LAYER_COMPUTE_FACTOR)
                                        * per_layer)
    fig = stream_figures([region] * s.cut, resident, flash, compute)
    return FrontFlash("stream", fixed_mb + len(resident) * lf.resident_mb,
                      fig["token_ms_overlapped"] + emb["io_ms_per_token"],
                      prompt_tokens * emb["io_ms_per_token"] + fig["io_ms_per_token"], streamed,
                      fig["bytes_per_token"] + emb["bytes_per_token"], fig["io_ms_per_token"] + emb["io_ms_per_token"])


def cloud_decode_ms(cloud: CloudProfile, s: Setting, context: int) -> float:
    """The cloud back's compute for one decode token (ms), head included."""
    f = cloud.figures
    per_layer = layer_decode_ms(f.layer(s.back_precision), f.context_tokens, context)
    work = f.step_overhead_ms + f.head_decode_ms + (f.n_layers - s.cut) * per_layer
    return max(cloud.step_floor_ms, cloud.decode_time_factor * work)


def decode_costs(dev: DeviceProfile, cloud: CloudProfile, net: NetworkProfile, s: Setting,
                 up_bytes: float, context: int, device_ms: float | None = None) -> dict:
    """Per-token breakdown (ms) of one decode step; `up_bytes` = the codec's bytes for one row;
    `device_ms`: the front's time if not the all-resident compute (a flash option's)."""
    f = dev.figures
    return {
        "device_compute": device_decode_ms(dev, s, context) if device_ms is None else device_ms,
        "encode": f.codec_ms[s.codec] * dev.prefill_time_factor,
        "link": link_ms(net, up_bytes + f.frame_up_bytes, f.frame_down_bytes),
        "cloud_compute": cloud_decode_ms(cloud, s, context),
        "overhead": f.split_overhead_ms * dev.prefill_time_factor,
    }


def ttft_ms(dev: DeviceProfile, cloud: CloudProfile, net: NetworkProfile, s: Setting,
            prompt_bytes_per_token: float, prompt_tokens: int) -> float:
    """Time to first token (ms) for a prompt of `prompt_tokens`, from the prefill figures."""
    fd, fc = dev.figures, cloud.figures
    dev_ms = dev.prefill_time_factor * (fd.step_overhead_ms + fd.embed_ms + prompt_tokens * s.cut
                                        * fd.layer(s.front_precision).prefill_ms_per_token)
    cloud_work = fc.step_overhead_ms + fc.head_prefill_ms + prompt_tokens * (fc.n_layers - s.cut) \
        * fc.layer(s.back_precision).prefill_ms_per_token
    cloud_ms = max(cloud.step_floor_ms, cloud.prefill_time_factor * cloud_work)
    encode = fd.codec_ms[s.codec] * dev.prefill_time_factor * prompt_tokens
    up = prompt_bytes_per_token * prompt_tokens + 2 * fd.frame_up_bytes  # open + prefill frames
    return dev_ms + encode + link_ms(net, up, fd.frame_down_bytes) + cloud_ms \
        + fd.split_overhead_ms * dev.prefill_time_factor


def costs(dev: DeviceProfile, cloud: CloudProfile, net: NetworkProfile, s: Setting, *,
          up_bytes: float, prompt_bytes_per_token: float, context: int, prompt_tokens: int,
          budget_mb: float | None = None) -> Costs | None:
    """All predictions for `s`: memory at a full KV cache (max_seq_len tokens), latency at `context`.

    `budget_mb`: the memory limit a 'stream' front fills (default the usable memory); None when
    `s.flash` does not apply to `s` (see `front_flash`).
    """
    f = dev.figures
    running_mb = running_memory_mb(f, s.cut, s.front_precision, s.kv_precision, s.max_seq_len, prompt_tokens)
    other_mb = running_mb - f.embedding_mb - s.cut * f.layer(s.front_precision).resident_mb
    front = front_flash(dev, s, context, prompt_tokens,
                        dev.usable_memory_mb if budget_mb is None else budget_mb, other_mb)
    if front is None:
        return None
    breakdown = decode_costs(dev, cloud, net, s, up_bytes, context, device_ms=front.decode_ms)
    typical = sum(breakdown.values())
    retry = retransmit_ms(net, up_bytes + f.frame_up_bytes, f.frame_down_bytes)
    memory = max(opening_memory_mb(f, s.cut), running_mb if s.flash == "resident" else other_mb + front.front_mb)
    ttft = ttft_ms(dev, cloud, net, s, prompt_bytes_per_token, prompt_tokens) + front.prefill_io_ms
    return Costs(memory, typical, typical + retry, ttft, breakdown, front,
                 cloud_usd_per_mtok(cloud, breakdown["cloud_compute"]))


def cloud_usd_per_mtok(cloud: CloudProfile, cloud_ms_per_token: float) -> float:
    """USD per million decode tokens of cloud compute: the worker's seconds per token x its price per
    second, as if one session had the worker to itself (batching divides it by the batch)."""
    return cloud_ms_per_token / 1000.0 * cloud.price_per_hour_usd / 3600.0 * 1e6
