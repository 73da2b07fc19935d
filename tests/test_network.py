"""Network profiles (typed TOML) and the link emulation model."""

from __future__ import annotations

import random
import time
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from edgesplit.profiles.network import (
    DOWNLINK,
    UPLINK,
    NetworkProfile,
    list_network_profiles,
    load_network_profile,
)
from edgesplit.runtime.errors import ConfigError
from edgesplit.transport.link import (
    RTO_MIN_MS,
    EmulatedLink,
    rto_ms,
    serialization_ms,
    sleep_until,
    transfer,
    transfer_ms,
)

BUILTIN = ["3g-poor", "5g", "loopback", "lte", "wifi"]

VALID = """\
name = "test"
description = "a test link"
uplink_mbps = 10
downlink_mbps = 30.0
rtt_ms = 50.0
jitter_ms = 10.0
loss_pct = 0.5
source = "made up for a test"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "custom.toml"
    path.write_text(text)
    return path


def replace_line(field: str, line: str | None) -> str:
    """VALID with the line of ``field`` replaced by ``line`` (None = removed)."""
    out = [l for l in VALID.splitlines() if not l.startswith(field + " ")]
    if line is not None:
        out.append(line)
    return "\n".join(out) + "\n"


def make(**kw) -> NetworkProfile:
    base = dict(name="t", description="d", uplink_mbps=10.0, downlink_mbps=30.0, rtt_ms=50.0,
                jitter_ms=0.0, loss_pct=0.0, source="s")
    base.update(kw)
    return NetworkProfile(**base)


# ---------------------------------------------------------------- profiles

def test_every_builtin_profile_loads():
    assert list_network_profiles() == BUILTIN
    for name in BUILTIN:
        p = load_network_profile(name)
        assert p.name == name
        assert p.uplink_mbps > 0 and p.downlink_mbps > 0
        assert 0 <= p.loss_pct < 100 and p.rtt_ms >= 0 and p.jitter_ms >= 0
        assert p.source.strip() and p.description.strip()
    lte = load_network_profile("lte")
    assert (lte.uplink_mbps, lte.downlink_mbps, lte.rtt_ms) == (10.0, 30.0, 50.0)
    loop = load_network_profile("loopback")
    assert loop.rtt_ms == 0 and loop.jitter_ms == 0 and loop.loss_pct == 0
    assert loop.uplink_mbps >= 1e4


def test_profile_is_frozen_and_loads_by_path(tmp_path):
    p = load_network_profile(write(tmp_path, VALID))
    assert isinstance(p.uplink_mbps, float) and p.uplink_mbps == 10.0
    with pytest.raises(FrozenInstanceError):
        p.rtt_ms = 1.0  # type: ignore[misc]
    assert load_network_profile(str(tmp_path / "custom.toml")) == p
    assert p.to_dict()["loss_pct"] == 0.5


@pytest.mark.parametrize(
    "field, line, words",
    [
        ("speed_mbps", 'speed_mbps = 3.0', ["unknown", "speed_mbps", "3.0"]),
        ("rtt_ms", None, ["missing", "rtt_ms"]),
        ("uplink_mbps", 'uplink_mbps = "fast"', ["uplink_mbps", "'fast'", "number"]),
        ("jitter_ms", "jitter_ms = true", ["jitter_ms", "True", "number"]),
        ("name", "name = 3", ["name", "3", "string"]),
        ("uplink_mbps", "uplink_mbps = -5.0", ["uplink_mbps", "-5.0", "> 0"]),
        ("downlink_mbps", "downlink_mbps = 0", ["downlink_mbps", "0", "> 0"]),
        ("rtt_ms", "rtt_ms = -1", ["rtt_ms", "-1", ">= 0"]),
        ("loss_pct", "loss_pct = 100", ["loss_pct", "100", "< 100"]),
        ("loss_pct", "loss_pct = nan", ["loss_pct", "nan", "finite"]),
    ],
)
def test_bad_profile_names_file_field_and_value(tmp_path, field, line, words):
    path = write(tmp_path, replace_line(field, line))
    with pytest.raises(ConfigError) as err:
        load_network_profile(path)
    msg = str(err.value)
    assert str(path) in msg
    for word in words:
        assert word in msg, (word, msg)


def test_bad_file_and_unknown_name(tmp_path):
    with pytest.raises(ConfigError, match="unknown name 'moon'.*lte"):
        load_network_profile("moon")
    with pytest.raises(ConfigError, match="nope.toml"):
        load_network_profile(tmp_path / "nope.toml")
    bad = write(tmp_path, "name = [unclosed\n")
    with pytest.raises(ConfigError, match="custom.toml.*invalid TOML"):
        load_network_profile(bad)


# ---------------------------------------------------------------- link model

def test_loopback_transfer_is_about_zero():
    loop = load_network_profile("loopback")
    rng = random.Random(0)
    for direction in (UPLINK, DOWNLINK):
        assert transfer_ms(2304, direction, loop, rng) < 0.001  # one (1, 576) f32 activation
        assert transfer_ms(1_000_000, direction, loop, rng) < 0.1


def test_lte_matches_formula():
    lte = load_network_profile("lte")
    nbytes = 100_000
    # with jitter and loss removed, the model is exact
    plain = make(uplink_mbps=lte.uplink_mbps, downlink_mbps=lte.downlink_mbps, rtt_ms=lte.rtt_ms)
    up = transfer_ms(nbytes, UPLINK, plain, random.Random(0))
    assert up == pytest.approx(50.0 / 2 + nbytes * 8 / 10e6 * 1000)  # 25 + 80 ms
    down = transfer_ms(nbytes, DOWNLINK, plain, random.Random(0))
    assert down == pytest.approx(25.0 + nbytes * 8 / 30e6 * 1000)
    # with the real profile: same formula, given the drawn jitter and losses
    rng = random.Random(7)
    for _ in range(200):
        t = transfer(nbytes, UPLINK, lte, rng)
        ser = serialization_ms(nbytes, lte.uplink_mbps)
        assert t.serialization_ms == pytest.approx(ser)
        assert t.latency_ms >= 0
        assert t.retransmit_ms == pytest.approx(t.losses * (rto_ms(lte) + ser))
        assert t.total_ms == pytest.approx(t.latency_ms + ser + t.retransmit_ms)
    assert rto_ms(lte) == RTO_MIN_MS and rto_ms(make(rtt_ms=300.0)) == 600.0


def test_latency_never_negative():
    wild = make(rtt_ms=2.0, jitter_ms=50.0)
    rng = random.Random(1)
    values = [transfer(0, UPLINK, wild, rng).latency_ms for _ in range(2000)]
    assert min(values) == 0.0 and max(values) > 1.0


def test_seeded_draws_are_reproducible():
    p = load_network_profile("3g-poor")
    a = [transfer_ms(5000, UPLINK, p, random.Random(42)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    r1, r2 = random.Random(3), random.Random(3)
    s1 = [transfer(5000, DOWNLINK, p, r1) for _ in range(500)]
    s2 = [transfer(5000, DOWNLINK, p, r2) for _ in range(500)]
    assert s1 == s2
    assert len({t.latency_ms for t in s1}) > 400  # jitter does vary
    l1 = EmulatedLink(p, seed=9, clock=lambda: 0.0)
    l2 = EmulatedLink(p, seed=9, clock=lambda: 0.0)
    d1 = [l1.send(1000, UPLINK, now_ms=i * 1000.0) for i in range(300)]
    d2 = [l2.send(1000, UPLINK, now_ms=i * 1000.0) for i in range(300)]
    assert d1 == d2
    assert l1.report() == l2.report()


def test_one_seed_gives_every_frame_size_the_same_draws():
    # sweep/plan-check give every configuration of a pass one seed (common random numbers): two
    # codecs' frames of different sizes must meet the same jitter and losses, differing only by
    # their serialization
    p = load_network_profile("3g-poor")
    small = [transfer(300, UPLINK, p, r) for r in [random.Random(7)] for _ in range(400)]
    large = [transfer(2300, UPLINK, p, r) for r in [random.Random(7)] for _ in range(400)]
    assert [(t.latency_ms, t.losses) for t in small] == [(t.latency_ms, t.losses) for t in large]
    assert any(t.losses for t in small) and all(b.serialization_ms > a.serialization_ms for a, b in zip(small, large))


def test_loss_rate_near_profile():
    p = make(loss_pct=2.0)
    rng = random.Random(123)
    n = 10_000
    losses = sum(transfer(100, UPLINK, p, rng).losses for _ in range(n))
    attempts = n + losses
    # binomial std of the rate at p=0.02, n~10,200: ~0.0014; allow ~4 sigma
    assert losses / attempts == pytest.approx(0.02, abs=0.006)
    lossless = make(loss_pct=0.0)
    assert sum(transfer(100, UPLINK, lossless, rng).losses for _ in range(1000)) == 0


# ---------------------------------------------------------------- EmulatedLink

def test_back_to_back_frames_queue_on_the_same_direction():
    lte = make(rtt_ms=50.0, uplink_mbps=10.0, downlink_mbps=30.0)
    link = EmulatedLink(lte, seed=0, clock=lambda: 0.0)
    nbytes = 1_000_000  # 800 ms at 10 Mbit/s
    ser = serialization_ms(nbytes, 10.0)
    first = link.send(nbytes, UPLINK, now_ms=0.0)
    second = link.send(nbytes, UPLINK, now_ms=0.0)
    assert first == pytest.approx(25.0 + ser)
    assert second == pytest.approx(25.0 + 2 * ser)  # waited for the first to finish
    assert second > first
    assert link.totals[UPLINK].queue_ms == pytest.approx(ser)
    # the other direction is independent (full duplex)
    assert link.send(nbytes, DOWNLINK, now_ms=0.0) == pytest.approx(25.0 + nbytes * 8 / 30e6 * 1e3)
    # after the link drains, no queueing
    assert link.send(nbytes, UPLINK, now_ms=10_000.0) == pytest.approx(first)


def test_frames_arrive_in_order_despite_jitter():
    p = make(rtt_ms=20.0, jitter_ms=30.0, uplink_mbps=1000.0)
    link = EmulatedLink(p, seed=5, clock=lambda: 0.0)
    arrivals = [t + link.send(100, UPLINK, now_ms=t) for t in range(0, 500, 1)]
    assert arrivals == sorted(arrivals)


def test_totals_add_up():
    p = load_network_profile("3g-poor")
    link = EmulatedLink(p, seed=11, clock=lambda: 0.0)
    rng = random.Random(0)
    sent = {UPLINK: [], DOWNLINK: []}
    delays = {UPLINK: 0.0, DOWNLINK: 0.0}
    now = 0.0
    for _ in range(400):
        direction = UPLINK if rng.random() < 0.5 else DOWNLINK
        nbytes = rng.randint(0, 5000)
        now += rng.uniform(0.0, 200.0)
        delays[direction] += link.send(nbytes, direction, now_ms=now)
        sent[direction].append(nbytes)
    rep = link.report()
    assert rep["profile"] == "3g-poor" and rep["seed"] == 11
    total_losses = 0
    for d in (UPLINK, DOWNLINK):
        tot = link.totals[d]
        assert tot.frames == len(sent[d]) == rep[d]["frames"]
        assert tot.bytes == sum(sent[d])
        assert tot.delay_ms == pytest.approx(delays[d])
        assert tot.serialization_ms == pytest.approx(
            sum(serialization_ms(n, p.bandwidth_mbps(d)) for n in sent[d]))
        # each delay = queue + serialization + retransmissions + latency (+ in-order wait >= 0)
        parts = tot.queue_ms + tot.serialization_ms + tot.retransmit_ms + tot.latency_ms
        assert tot.delay_ms >= parts - 1e-6
        total_losses += tot.losses
    assert total_losses > 0  # 2% of 400 frames


def test_bad_direction_and_size():
    link = EmulatedLink(make())
    with pytest.raises(ConfigError, match="sideways"):
        link.send(10, "sideways")
    with pytest.raises(ConfigError, match="-1"):
        transfer_ms(-1, UPLINK, make(), random.Random(0))


def test_sleep_until_is_precise_and_deliver_applies_delay():
    deadline = time.perf_counter() + 0.02
    late = sleep_until(deadline)
    assert time.perf_counter() >= deadline
    assert 0.0 <= late < 0.005  # s; the final spin makes it ~microseconds unless preempted
    assert sleep_until(time.perf_counter() - 1.0) >= 1.0  # already passed: returns at once
    link = EmulatedLink(make(rtt_ms=20.0, uplink_mbps=1000.0))
    t0 = time.perf_counter()
    delay = link.deliver(100, UPLINK)
    assert delay == pytest.approx(10.0 + 100 * 8 / 1e9 * 1e3)
    assert time.perf_counter() - t0 >= delay / 1000.0
