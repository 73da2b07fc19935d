"""The `edgesplit` command run in-process on the tiny random model (no download)."""

import json
import re
import sys

import pytest

from edgesplit.cli import main
from edgesplit.runtime.store import ModelStore
from tiny_gguf import write_tiny_gguf

SUMMARY = re.compile(
    r"prompt: (\d+) tokens, [\d.]+ tok/s \| decode: (\d+) tokens, [\d.]+ tok/s \| peak RSS \d+ MB"
)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("cli") / "tiny.gguf")


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    # one cache per module run, so the GGUF is converted once and reused by later tests
    path = tmp_path_factory.getbasetemp() / "cli-cache"
    monkeypatch.setenv("EDGESPLIT_CACHE", str(path))
    return path


def test_convert(gguf, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(["convert", str(gguf), "--out", str(out), "--precisions", "q4,q8"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert ModelStore(out).precisions == ("q4", "q8")


def test_generate_streams_text_and_summary(gguf, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"  # fresh: this test sees the first conversion
    monkeypatch.setenv("EDGESPLIT_CACHE", str(cache))
    args = ["generate", "--model", str(gguf), "--max-tokens", "8", "--temperature", "1", "--seed", "3",
            "the cat"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert first.out.strip()
    m = SUMMARY.search(first.err)
    assert m, first.err
    assert int(m.group(1)) > 0 and 1 <= int(m.group(2)) <= 8
    stores = list((cache / "stores").iterdir())
    assert len(stores) == 1 and stores[0].name.startswith("tiny-")
    # second run: the converted store is reused (no conversion logged) and the seed repeats the text
    assert main(args) == 0
    again = capsys.readouterr()
    assert again.out == first.out
    assert "converting" not in again.err and "converting" in first.err


def test_generate_chat_split_equals_whole(gguf, capsys):
    base = ["generate", "--model", str(gguf), "--max-tokens", "10", "--temperature", "1.2", "--seed", "5",
            "--chat", "--system", "be brief", "--accuracy-level", "0", "--head-accuracy-level", "0"]
    assert main([*base, "hello"]) == 0
    whole = capsys.readouterr().out
    assert main([*base, "--segments", "0,1,3", "hello"]) == 0
    assert capsys.readouterr().out == whole


def test_generate_prompt_too_long(gguf, capsys):
    assert main(["generate", "--model", str(gguf), "--max-seq-len", "16", "--max-tokens", "10",
                 "the cat in the hat"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgesplit: error:") and "max_tokens 10" in err and "max_seq_len 16" in err


def test_unknown_model_name(capsys):
    assert main(["generate", "--model", "gpt-17", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgesplit: error:") and "gpt-17" in err and "smollm2-135m" in err


def test_missing_file(tmp_path, capsys):
    missing = tmp_path / "nope" / "model.gguf"
    assert main(["generate", "--model", str(missing), "hi"]) == 2
    assert str(missing) in capsys.readouterr().err
    assert main(["convert", str(missing), "--out", str(tmp_path / "s")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_system_needs_chat(gguf, capsys):
    assert main(["generate", "--model", str(gguf), "--system", "x", "hi"]) == 2
    assert "--chat" in capsys.readouterr().err


def test_pull_unknown_lists_known(capsys):
    assert main(["pull", "nope"]) == 2
    assert "smollm2-135m" in capsys.readouterr().err


def test_eval_and_bench_dispatch(monkeypatch, capsys):
    """The CLI turns flags into typed requests (EvalRequest, BenchRequest) and prints the result."""
    from edgesplit.harness import bench, evaluate

    seen = {}

    def fake(kind):
        def run(req):
            seen[kind] = req
            return {"kind": kind}
        return run

    monkeypatch.setattr(evaluate, "run_eval", fake("evaluate"))
    monkeypatch.setattr(bench, "run_bench", fake("bench"))
    assert main(["eval", "--text", "wiki.txt", "--segments", "0,12,30", "--tokens", "100"]) == 0
    assert json.loads(capsys.readouterr().out) == {"kind": "evaluate"}
    a = seen["evaluate"]
    assert isinstance(a, evaluate.EvalRequest)
    assert (str(a.text), a.tokens, a.window, a.segments, a.model) == ("wiki.txt", 100, 512, (0, 12, 30), "smollm2-135m")
    assert main(["bench", "--vs", "llama.cpp", "--runs", "2", "--accuracy-level", "4"]) == 0
    assert json.loads(capsys.readouterr().out) == {"kind": "bench"}
    b = seen["bench"]
    assert isinstance(b, bench.BenchRequest)
    assert (b.vs, b.runs, b.prompt_tokens, b.decode_tokens, b.engine.accuracy_level, b.engine.threads) == \
        ("llama.cpp", 2, 128, 128, 4, 2)


def test_bad_values_are_refused_where_they_are_made(capsys, cache):
    """Each before any model is fetched or loaded (the cache stays empty)."""
    assert main(["generate", "--threads", "0", "hi"]) == 2
    assert "threads must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["eval", "--text", "t.txt", "--tokens", "1"]) == 2
    assert "tokens must be an integer >= 2, got 1" in capsys.readouterr().err
    assert main(["bench", "--runs", "0"]) == 2
    assert "runs must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["loadtest", "--devices", "0"]) == 2
    assert "devices must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["cloud", "serve", "--bind", "garbage"]) == 2
    assert "--bind 'garbage': not a ZeroMQ endpoint" in capsys.readouterr().err
    assert main(["cloud", "serve", "--bind", "tcp://0.0.0.0:5999"]) == 2
    assert "plain text on a non-loopback address" in capsys.readouterr().err
    assert not (cache / "models").exists()
