"""Cost models of a split setting: device memory, per-token latency and time to first token.

Pure functions over profiles (no I/O, no model): the planner calls them for every candidate.

Memory (MB, device process peak RSS):
    runtime overhead + embedding + cut x resident MB per layer at the front precision
    + cut x KV bytes per token per layer x tokens held + workspace MB per prompt token x prompt.
"Resident per layer" is measured RSS (our shard arrays plus onnxruntime's prepacked copy), not
the shard size: that is what the device pays.

Latency (ms per decode token at a context of `context` tokens):
    device compute  = decode factor x (step overhead + embedding + cut x layer decode ms(context))
    encode          = codec ms (encode + decode of one row) x device prefill factor (CPU-bound)
    uplink/downlink = frame bytes / bandwidth, each way; + RTT
    cloud compute   = max(step floor, cloud factor x (step overhead + head + back layers x ms))
    overhead        = the measured split loop overhead (frames, sockets, detokenizing)
`ms_per_token` is the typical (median) token: a retransmission hits a token only now and then
(p_token = 1 - (1 - loss)^2, < 50% for every profile here) and so does not move the median, which
is what `simulate` and `sweep` report. `mean_ms_per_token` adds the expected retransmissions
(p / (1 - p) lost attempts per frame, each costing RTO + serialization).
Time to first token: the same with prefill figures for a prompt of `prompt_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgesplit.profiles.cloud import CloudProfile
from edgesplit.profiles.device import DeviceProfile, LayerFigures, MeasuredFigures
from edgesplit.profiles.network import NetworkProfile
from edgesplit.transport.link import rto_ms, serialization_ms


@dataclass(frozen=True)
class Setting:
    """One candidate: the plan's decision variables (head precision and accuracy level fixed)."""

    cut: int
    front_precision: str
    back_precision: str
    kv_precision: str
    codec: str
    max_seq_len: int


@dataclass(frozen=True)
class Costs:
    """Predicted figures of one setting (units in the names)."""

    device_memory_mb: float
    ms_per_token: float  # typical (median) decode token
    mean_ms_per_token: float  # with the expected retransmissions
    ttft_ms: float
    breakdown_ms: dict  # per decode token: device_compute, encode, link, cloud_compute, overhead


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


def device_memory_mb(fig: MeasuredFigures, cut: int, front_precision: str, kv_precision: str,
                     tokens: int, prompt_tokens: int = 0) -> float:
    """Peak RSS (MB) of a device process holding [0, cut) with `tokens` positions of KV in use."""
    kv_mb = cut * fig.kv_bytes_per_token_per_layer[kv_precision] * tokens / 2**20
    return (fig.runtime_overhead_mb + fig.embedding_mb + cut * fig.layer(front_precision).resident_mb
            + kv_mb + fig.workspace_mb_per_prompt_token * prompt_tokens)


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


def cloud_decode_ms(cloud: CloudProfile, s: Setting, context: int) -> float:
    """The cloud back's compute for one decode token (ms), head included."""
    f = cloud.figures
    per_layer = layer_decode_ms(f.layer(s.back_precision), f.context_tokens, context)
    work = f.step_overhead_ms + f.head_decode_ms + (f.n_layers - s.cut) * per_layer
    return max(cloud.step_floor_ms, cloud.decode_time_factor * work)


def decode_costs(dev: DeviceProfile, cloud: CloudProfile, net: NetworkProfile, s: Setting,
                 up_bytes: float, context: int) -> dict:
    """Per-token breakdown (ms) of one decode step; `up_bytes` = the codec's bytes for one row."""
    f = dev.figures
    return {
        "device_compute": device_decode_ms(dev, s, context),
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
          up_bytes: float, prompt_bytes_per_token: float, context: int, prompt_tokens: int) -> Costs:
    """All predictions for `s`: memory at a full KV cache (max_seq_len tokens), latency at `context`."""
    breakdown = decode_costs(dev, cloud, net, s, up_bytes, context)
    typical = sum(breakdown.values())
    retry = retransmit_ms(net, up_bytes + dev.figures.frame_up_bytes, dev.figures.frame_down_bytes)
    return Costs(device_memory_mb(dev.figures, s.cut, s.front_precision, s.kv_precision, s.max_seq_len,
                                  prompt_tokens),
                 typical, typical + retry, ttft_ms(dev, cloud, net, s, prompt_bytes_per_token, prompt_tokens),
                 breakdown)
