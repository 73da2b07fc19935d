"""`edgesplit bench --flash` end to end on the tiny model: JSON lines, refusals with numbers."""

from __future__ import annotations

import json

import pytest

from edgesplit.cli import main
from edgesplit.device.flash.layout import flash_settings
from edgesplit.device.flash.stream import StreamedLayer

WORDS = "the cat sat on the mat and the dog ran to the cat while a bird sang " * 12


@pytest.fixture()
def text(tmp_path):
    (tmp_path / "test.txt").write_text(WORDS)
    (tmp_path / "valid.txt").write_text(WORDS[::-1] * 4)  # the predictor's calibration text (2048 tokens)
    return tmp_path / "test.txt"


def run(capsys, *argv):
    code = main(["bench", "--flash", "--accuracy-level", "0", "--tokens", "64", "--window", "32",
                 "--decode-tokens", "3", "--stream-tokens", "64", *map(str, argv)])
    out = capsys.readouterr()
    return code, [json.loads(line) for line in out.out.splitlines()], out.err


KEYS = {"mode", "budget_mb", "resident_mb", "bytes_read_per_token", "naive_bytes_read_per_token", "tok_s",
        "naive_tok_s", "io_bound_tok_s", "top1_agreement", "ppl"}


def test_embedding_and_stream(tiny_store, text, capsys):
    code, rows, _ = run(capsys, "--model", tiny_store.path, "--text", text, "--mode", "embedding",
                        "--budget-fraction", "1.0")
    assert code == 0 and KEYS <= set(rows[0])
    assert rows[0]["top1_agreement"] == 1.0 and rows[0]["max_abs_dhidden"] == 0.0
    # room for the row cache, the two streamed layers in DRAM and one resident layer
    layer = StreamedLayer(tiny_store, 0, flash_settings(accuracy_level=0), 32, 1)
    budget_mb = (256 * 68 + 3.5 * layer.nbytes) / 1e6
    layer.close()
    code, rows, _ = run(capsys, "--model", tiny_store.path, "--text", text, "--mode", "stream",
                        "--budget-mb", budget_mb, "--profile", "rpi5-8gb")
    assert code == 0 and rows[0]["mode"] == "stream" and rows[0]["streamed_layers"] >= 1
    assert rows[0]["top1_agreement"] == 1.0 and rows[0]["tok_s_modelled"] > 0


def test_neurons(tiny_store, text, capsys, tmp_path):
    code, rows, _ = run(capsys, "--model", tiny_store.path, "--text", text, "--mode", "neurons",
                        "--plot", tmp_path / "n.png")
    assert code == 0 and KEYS | {"window", "sparsity"} <= set(rows[0])
    assert (tmp_path / "n.png").stat().st_size > 0


def test_budget_refused_with_numbers(tiny_store, text, capsys):
    code, rows, err = run(capsys, "--model", tiny_store.path, "--text", text, "--mode", "embedding",
                          "--budget-mb", "0.01")
    assert code == 2 and not rows
    assert "does not fit the memory budget" in err and "> budget 0.01 MB" in err


def test_embedding_with_the_default_budget_works(tiny_store, text, capsys):
    """The default --budget-fraction (0.5 of the whole front) is below what embedding mode keeps
    resident (every layer): the default budget is raised to that minimum instead of failing."""
    code, rows, err = run(capsys, "--model", tiny_store.path, "--text", text, "--mode", "embedding")
    assert code == 0, err
    assert rows[0]["budget_mb"] == pytest.approx(rows[0]["resident_mb"])
