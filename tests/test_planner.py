"""The cost model and the planner on small synthetic profiles and fidelity tables (no model, no I/O)."""

from __future__ import annotations

import dataclasses

import pytest

from edgesplit.device.planning.cost_model import (FLASH_OPTIONS, Setting, costs, device_memory_mb, layer_decode_ms, link_ms,
                                         retransmit_ms)
from edgesplit.device.planning.flash_model import (EMBEDDING_CACHE_ROWS, EMBEDDING_MISS_RATE, PACKED_BYTES_PER_SHARD_BYTE,
                                                   STREAMED_LAYER_COMPUTE_FACTOR, FlashModel, q8_row_bytes)
from edgesplit.device.planning.fidelity import FidelityTable
from edgesplit.device.planning.fidelity_data import CodecRow, EngineRow
from edgesplit.device.planning.planner import InfeasibleError, Request, choose, enumerate_candidates, pareto_front
from edgesplit.profiles.cloud import CloudProfile
from edgesplit.profiles.device import DeviceProfile, LayerFigures, MeasuredFigures
from edgesplit.profiles.network import NetworkProfile
from edgesplit.runtime.hparams import PREFILL_CHUNK
from edgesplit.runtime.plan import Plan

L, D = 4, 8


def figures() -> MeasuredFigures:
    layers = {"q4": LayerFigures((1.0, 2.0), 0.1, 10.0, 1000), "f32": LayerFigures((3.0, 4.0), 0.3, 40.0, 4000)}
    return MeasuredFigures(
        model="synthetic", n_layers=L, d_model=D, threads=1, context_tokens=(64, 1024), prefill_tokens=16,
        step_overhead_ms=0.5, embed_ms=0.1, head_decode_ms=1.0, head_prefill_ms=2.0, runtime_overhead_mb=100.0,
        embedding_mb=20.0, workspace_mb_per_prompt_token=0.0, open_overhead_mb=0.0, open_mb_per_layer=0.0,
        kv_bytes_per_token_per_layer={"f32": 1024, "int8": 256},
        codec_ms={"f32": 0.01, "int8": 0.05}, split_overhead_ms=0.0, frame_up_bytes=100, frame_down_bytes=100,
        layers=layers)


def device(factor: float = 1.0, usable_mb: float = 10_000.0) -> DeviceProfile:
    return DeviceProfile("dev", "d", "test", "datasheet", "host", factor, factor, 20_000.0, usable_mb, 1,
                         40.0, 4.0, 15.0, figures())


def device_with(f: MeasuredFigures) -> DeviceProfile:
    return dataclasses.replace(device(), figures=f)


def cloud(factor: float = 1.0) -> CloudProfile:
    return CloudProfile("cl", "c", "test", "host", factor, factor, 0.0, 1.0, 1.0, figures())


def net(mbps: float = 1000.0, rtt_ms: float = 10.0, loss_pct: float = 0.0) -> NetworkProfile:
    return NetworkProfile("n", "n", mbps, mbps, rtt_ms, 0.0, loss_pct, "test")


TABLE = FidelityTable(
    engine=(EngineRow("q4", "f32", 0.97, 10.1, 10.0, 100, "t"), EngineRow("f32", "f32", 1.0, 10.0, 10.0, 100, "t"),
            EngineRow("q4", "int8", 0.95, 10.3, 10.0, 100, "t")),
    codec=(CodecRow(1, "int8", 0.95, 0.97, 10.2, 10.1, 20, 19), CodecRow(3, "int8", 0.93, 0.97, 10.4, 10.1, 20, 19)),
)
REQ = dict(max_seq_len=256, prompt_tokens=16, min_top1=None)


def run(dev, cl, nw, **req):
    return choose(dev, cl, nw, TABLE, Request(**{**REQ, **req}), context_length=1024)


def test_memory_model_adds_its_parts():
    f = figures()
    # 100 overhead + 20 embedding + 2 x 10 MB layers + 2 layers x 1024 B x 512 tokens (1.048576 MB)
    assert device_memory_mb(f, 2, "q4", "f32", tokens=512) == pytest.approx(141.048576)


def test_memory_is_the_larger_of_opening_and_running_the_front():
    """A process peaks while it opens its front (the libraries' set-up code still resident) or
    while it runs it, whichever is larger: a small front opens above what it runs in."""
    f = dataclasses.replace(figures(), open_overhead_mb=150.0, open_mb_per_layer=1.0)
    # running: 100 + 20 + cut x 10 MB + KV (cut x 1024 B x 512 tokens)
    assert device_memory_mb(f, 1, "q4", "f32", tokens=512) == pytest.approx(151.0)  # opening: 150 + 1
    assert device_memory_mb(f, 4, "q4", "f32", tokens=512) == pytest.approx(160.0 + 4 * 1024 * 512 / 1e6)
    s = Setting(1, "q4", "q4", "f32", "f32", 512)
    c = costs(device(), cloud(), net(), s, up_bytes=100.0, prompt_bytes_per_token=100.0, context=64,
              prompt_tokens=16)
    assert c is not None and c.device_memory_mb == pytest.approx(100.0 + 20.0 + 10.0 + 1024 * 512 / 1e6)
    c = costs(device_with(f), cloud(), net(), s, up_bytes=100.0, prompt_bytes_per_token=100.0, context=64,
              prompt_tokens=16)
    assert c is not None and c.device_memory_mb == pytest.approx(151.0)


def test_prompt_workspace_stops_growing_at_the_prefill_chunk():
    """A prompt runs in chunks of PREFILL_CHUNK positions (the engine), so the activation workspace
    the model adds grows with the prompt only up to one chunk."""
    f = dataclasses.replace(figures(), workspace_mb_per_prompt_token=0.05)
    base = device_memory_mb(f, 2, "q4", "f32", tokens=2048)
    assert device_memory_mb(f, 2, "q4", "f32", tokens=2048, prompt_tokens=100) == pytest.approx(base + 5.0)
    for prompt in (PREFILL_CHUNK, 4 * PREFILL_CHUNK):
        assert device_memory_mb(f, 2, "q4", "f32", tokens=2048, prompt_tokens=prompt) == \
            pytest.approx(base + 0.05 * PREFILL_CHUNK)


def test_layer_time_is_interpolated_in_the_context():
    lf = figures().layers["q4"]
    assert layer_decode_ms(lf, (64, 1024), 10) == 1.0
    assert layer_decode_ms(lf, (64, 1024), 544) == pytest.approx(1.5)
    assert layer_decode_ms(lf, (64, 1024), 1984) == pytest.approx(3.0)  # extrapolated


def test_link_time_counts_bandwidth_rtt_and_expected_losses():
    assert link_ms(net(8.0, 10.0), 1000, 0) == pytest.approx(1.0 + 10.0)  # 1000 B at 8 Mbit/s = 1 ms
    assert retransmit_ms(net(8.0, 10.0), 1000, 0) == 0.0
    lossy = retransmit_ms(net(8.0, 10.0, loss_pct=50.0), 1000, 0)
    assert lossy == pytest.approx(1.0 * (2 * 200.0 + 1.0))  # p/(1-p) = 1 retry per frame, RTO 200 ms


def test_slow_device_puts_the_cut_early_slow_cloud_puts_it_late():
    assert run(device(10.0), cloud(1.0), net()).chosen.setting.cut == 1
    assert run(device(1.0), cloud(10.0), net()).chosen.setting.cut == L - 1


def test_memory_objective_takes_the_smallest_front_and_fidelity_the_best_table_row():
    c = run(device(), cloud(), net(), objective="memory").chosen.setting
    assert (c.cut, c.front_precision, c.kv_precision, c.max_seq_len) == (1, "q4", "int8", 256)
    best = run(device(), cloud(), net(), objective="fidelity").chosen
    assert (best.setting.front_precision, best.setting.back_precision, best.setting.codec) == ("f32", "f32", "f32")
    assert best.fidelity.top1 == pytest.approx(1.0)
    assert best.setting.max_seq_len == 1024  # fidelity ties: the longest context that fits


def test_fidelity_floor_excludes_lossy_settings():
    c = run(device(), cloud(), net(mbps=0.1), min_top1=0.969).chosen
    assert c.fidelity.top1 >= 0.969 and c.setting.codec == "f32"  # int8 codec would be faster on 0.1 Mbit/s


def test_mixed_precision_fidelity_is_interpolated_by_layers():
    fid = TABLE.estimate(1, L, "q4", "f32", "f32", "f32")
    assert fid.top1 == pytest.approx(1.0 - 0.25 * 0.03)
    assert TABLE.estimate(2, L, "q4", "q4", "f32", "int8").top1 == pytest.approx(0.97 - 0.03)  # loss interpolated
    assert TABLE.estimate(2, L, "q8", "q8", "f32", "f32") is None  # q8 not measured: not offered


def test_infeasible_memory_names_the_device_the_need_and_the_limit():
    with pytest.raises(InfeasibleError) as err:
        run(device(usable_mb=100.0), cloud(), net())
    msg = str(err.value)
    assert msg.startswith("dev: memory: ") and "needed at cut 1" in msg and "100.0 MB usable" in msg
    assert "missed by" in msg


def test_infeasible_latency_and_fidelity_name_their_constraint():
    with pytest.raises(InfeasibleError, match=r"dev: latency: .* ms/token predicted at cut .*, 5.0 ms/token allowed"):
        run(device(), cloud(), net(), latency_ms=5.0)
    worse = dataclasses.replace(TABLE, engine=tuple(dataclasses.replace(r, top1=r.top1 - 0.02) for r in TABLE.engine))
    with pytest.raises(InfeasibleError, match=r"fidelity floor missed: best top-1 0.9800 at cut .*, 0.9900 required"):
        choose(device(), cloud(), net(), worse, Request(**{**REQ, "min_top1": 0.99}), context_length=1024)


def test_pareto_front_is_exactly_the_non_dominated_set():
    cands = enumerate_candidates(device(2.0), cloud(), net(mbps=1.0), TABLE, Request(**REQ), 1024)
    front = pareto_front(cands)

    def dominates(a, b):
        ka = (a.costs.ms_per_token, a.costs.device_memory_mb, -a.fidelity.top1)
        kb = (b.costs.ms_per_token, b.costs.device_memory_mb, -b.fidelity.top1)
        return all(x <= y for x, y in zip(ka, kb)) and ka != kb

    assert front and len(front) < len(cands)
    for a in front:
        assert not any(dominates(b, a) for b in cands)
    keys = {id(c) for c in front}
    for c in cands:
        if id(c) not in keys:
            assert any(dominates(f, c) or f.costs == c.costs and f.fidelity == c.fidelity for f in front)


def test_an_f16_cache_is_offered_with_q4_layers_on_both_sides_only():
    """f16 caches are fast on CachedAttention, which runs with q4 layers; q8 and f32 layers run
    onnxruntime's attention, which converts them each step: those settings are not candidates."""
    fig = dataclasses.replace(figures(), kv_bytes_per_token_per_layer={"f32": 1024, "f16": 512, "int8": 256})
    dev = dataclasses.replace(device(), figures=fig)
    table = dataclasses.replace(TABLE, engine=TABLE.engine + (EngineRow("q4", "f16", 0.975, 10.1, 10.0, 100, "t"),))
    cands = enumerate_candidates(dev, cloud(), net(), table, Request(**REQ), 1024)
    f16 = {(c.setting.front_precision, c.setting.back_precision) for c in cands if c.setting.kv_precision == "f16"}
    assert f16 == {("q4", "q4")}
    assert {c.setting.front_precision for c in cands} == {"q4", "f32"}  # the others are still there


def test_request_validation():
    with pytest.raises(Exception, match="objective 'speed'"):
        Request(objective="speed")
    with pytest.raises(Exception, match="prompt_tokens"):
        Request(max_seq_len=8, prompt_tokens=16)
    assert Setting(1, "q4", "q4", "f32", "f32", 8).cut == 1


def flash_costs(s: Setting, budget_mb: float = 10_000.0, d_model: int = 64):
    """Costs of `s` on the synthetic device with d_model wide enough for real Q8_0 rows (68 B)."""
    dev = dataclasses.replace(device(), figures=dataclasses.replace(figures(), d_model=d_model))
    return costs(dev, cloud(), net(), s, up_bytes=100, prompt_bytes_per_token=100, context=64, prompt_tokens=16,
                 budget_mb=budget_mb)


def test_embedding_on_flash_swaps_the_table_for_a_row_cache_and_adds_row_reads():
    res = flash_costs(Setting(2, "q4", "q4", "f32", "f32", 256))
    emb = flash_costs(Setting(2, "q4", "q4", "f32", "f32", 256, "embedding"))
    row = q8_row_bytes(64)
    assert row == 68 and q8_row_bytes(576) == 612  # SmolLM2's Q8_0 row
    cache_mb = EMBEDDING_CACHE_ROWS * row / 1e6
    assert res.device_memory_mb - emb.device_memory_mb == pytest.approx(20.0 - cache_mb)  # table 20 MB
    flash = FlashModel.from_profile(device())  # 40 MB/s, 4 KB random 4 MB/s: 0.9216 ms per read
    assert flash.read_latency_ms == pytest.approx(4096 / 4e3 - 4096 / 40e3)
    io_ms = EMBEDDING_MISS_RATE * flash.read_ms(row)
    assert emb.ms_per_token - res.ms_per_token == pytest.approx(io_ms)
    assert emb.ttft_ms - res.ttft_ms == pytest.approx(16 * io_ms)  # one row per prompt token at the miss rate
    assert emb.flash.io_bytes_per_token == pytest.approx(EMBEDDING_MISS_RATE * row)


def test_stream_keeps_what_fits_the_budget_resident_and_overlaps_reads():
    s = Setting(3, "q4", "q4", "f32", "f32", 256, "stream")
    other = 100.0 + 3 * 1024 * 256 / 1e6  # runtime + KV (no prompt workspace)
    region = int(1000 * PACKED_BYTES_PER_SHARD_BYTE)  # packed bytes of a 1000 B shard
    fixed = other + EMBEDDING_CACHE_ROWS * 68 / 1e6 + 2 * region / 1e6  # row cache + 2 layers in DRAM
    c = flash_costs(s, budget_mb=fixed + 15.0)  # room for one 10 MB layer
    assert c.flash.streamed_layers == 2
    assert c.device_memory_mb == pytest.approx(fixed + 10.0)
    compute = 0.5 + 0.1 + (1 + 2 * STREAMED_LAYER_COMPUTE_FACTOR) * 1.0  # decode factor 1, 1 ms per layer at 64
    reads = FlashModel.from_profile(device()).read_ms(2 * region, 2)
    assert c.flash.decode_ms == pytest.approx(max(compute, reads) + c.flash.io_ms_per_token - reads)
    assert flash_costs(s, budget_mb=10_000.0) is None  # every layer fits: that is 'embedding', not offered
    assert flash_costs(Setting(3, "f32", "q4", "f32", "f32", 256, "stream")) is None  # flash holds q4 layers


def test_planner_takes_a_flash_option_where_the_resident_front_does_not_fit():
    flash = dict(flash_options=FLASH_OPTIONS)
    # resident at cut 1: 100 + 20 + 10 MB (+ KV) > 125; embedding on flash: ~110 MB fits
    with pytest.raises(InfeasibleError, match=r"dev: memory: 130.\d MB needed at cut 1 .*, 125.0 MB usable"):
        run(device(), cloud(), net(), memory_mb=125.0)
    c = run(device(), cloud(), net(), memory_mb=125.0, **flash)
    assert c.chosen.setting.flash == "embedding" and c.chosen.costs.device_memory_mb <= 125.0
    assert "front flash embedding" in c.why and "all-resident front needs at least 130." in c.why
    # below one resident layer: only streamed fronts fit
    c = run(device(), cloud(), net(), memory_mb=105.0, **flash)
    assert c.chosen.setting.flash == "stream" and c.chosen.costs.flash.streamed_layers >= 1
    assert c.chosen.costs.device_memory_mb <= 105.0
    # with room, latency keeps everything resident (flash reads only cost time)
    assert run(device(), cloud(), net(), **flash).chosen.setting.flash == "resident"
    with pytest.raises(InfeasibleError, match=r"dev: memory: 100.\d MB needed at cut 1 .*front flash stream\), "
                                              r"99.0 MB usable"):
        run(device(), cloud(), net(), memory_mb=99.0, **flash)


def test_flash_option_stays_out_of_the_plan():
    assert "flash" not in {f.name for f in dataclasses.fields(Plan)}
    with pytest.raises(Exception, match="flash_options"):
        Request(flash_options=("swap",))


def test_cost_objective_takes_the_deepest_cut_the_latency_target_allows():
    """Cloud cost falls with every layer the device runs; the latency target caps how many. A slow
    device: the looser the target, the deeper the cut, and the cheaper the plan."""
    slow = device(factor=4.0)
    loose, tight = run(slow, cloud(), net(), objective="cost"), None
    assert loose.chosen.setting.cut == L - 1  # no target: everything the device can afford
    tight = run(slow, cloud(), net(), objective="cost", latency_ms=loose.chosen.costs.ms_per_token - 0.5)
    assert tight.chosen.setting.cut < loose.chosen.setting.cut
    assert tight.chosen.costs.ms_per_token <= loose.chosen.costs.ms_per_token - 0.5
    assert tight.chosen.costs.cloud_usd_per_mtok > loose.chosen.costs.cloud_usd_per_mtok > 0
    assert "USD of cloud compute per 10^6 tokens" in tight.why


def test_cloud_cost_is_cloud_seconds_times_the_price():
    from edgesplit.device.planning.cost_model import cloud_usd_per_mtok

    cl = dataclasses.replace(cloud(), price_per_hour_usd=3.6)
    assert cloud_usd_per_mtok(cl, 2.0) == pytest.approx(2.0 / 1000 * 3.6 / 3600 * 1e6)  # 2 ms at $3.6/h: $2 per 10^6
    c = costs(device(), cl, net(), Setting(2, "q4", "q4", "f32", "f32", 256), up_bytes=32, prompt_bytes_per_token=32,
              context=64, prompt_tokens=16)
    assert c is not None and c.cloud_usd_per_mtok == pytest.approx(cloud_usd_per_mtok(cl, c.breakdown_ms["cloud_compute"]))


def test_cloud_profiles_carry_a_price():
    from edgesplit.profiles.cloud import cloud_profile_from_dict, list_cloud_profiles, load_cloud_profile

    for name in list_cloud_profiles():
        assert load_cloud_profile(name).price_per_hour_usd > 0
    data = {k: v for k, v in load_cloud_profile("host").to_dict().items() if k != "price_per_hour_usd"}
    with pytest.raises(Exception, match="price_per_hour_usd"):
        cloud_profile_from_dict(data, "x.toml")


def test_every_codec_of_the_shipped_table_has_a_timing_in_every_device_profile():
    """The planner drops a codec without a timing silently (planner.py: `c in fig.codec_ms`), so a
    fidelity row added without `profile --codecs-only` would never be offered."""
    from edgesplit.profiles.device import list_device_profiles, load_device_profile

    codecs = set(FidelityTable().codecs())
    assert {"ecq:step=0.2", "ecq:step=0.2,trellis=1", "ecq:step=0.2,trellis=1,adapt=1"} <= codecs
    for name in list_device_profiles():
        assert codecs <= set(load_device_profile(name).figures.codec_ms), name


def test_an_adaptive_codecs_prompt_traffic_counts_the_prompt_ids():
    """adapt=1 sends the prompt's ids (int32) with the prefill: 4 B a prompt token on top of the
    measured blob bytes; its decode rows cost what was measured."""
    from edgesplit.device.planning.fidelity import PROMPT_ID_BYTES
    from edgesplit.device.planning.fidelity_data import CODEC_ROWS

    row = next(r for r in CODEC_ROWS if r.codec.endswith("adapt=1") and r.cut == 15)
    got = FidelityTable().codec_bytes(row.codec, 15, 576)
    assert got == (row.bytes_per_token, row.bytes_per_prompt_token + PROMPT_ID_BYTES) and PROMPT_ID_BYTES == 4
    static = next(r for r in CODEC_ROWS if r.codec == "ecq:step=0.2,trellis=1" and r.cut == 15)
    assert FidelityTable().codec_bytes(static.codec, 15, 576) == (static.bytes_per_token, static.bytes_per_prompt_token)
