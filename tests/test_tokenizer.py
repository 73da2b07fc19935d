"""Tokenizer rebuilt from GGUF metadata: a hand-made vocabulary, then the real SmolLM2 model."""


import pytest

from edgesplit.runtime.errors import ConfigError, ModelFormatError
from edgesplit.runtime.tokenizer import StreamDecoder, Tokenizer, build_tokenizer

from tiny_gguf import bytes_to_unicode

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
STRINGS = [
    "Hello, world! This is a test.",
    "12345",
    "x = 3.14159 * 2e10; y = 1,000,000",
    "def f(x):\n    return x ** 2  # square\n",
    "héllo 世界 🚀",
    "  leading spaces",
    "\n\nnewlines\n\n\nand\r\nCRLF\ttabs",
    "I'm sure they've said it's fine",
    "😀👍🏽 👨‍👩‍👧 ﬁ ½ Ωmega",
    "   trailing   ",
]


def tiny_metadata(**overrides) -> dict:
    byte_chars = [bytes_to_unicode()[b] for b in range(256)]
    merges = ["h e", "l l", "he ll", "Ġ w", "o r"]
    tokens = SPECIALS + byte_chars + [m.replace(" ", "") for m in merges]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 1,  # wrong on purpose, as in the SmolLM2 GGUF family
        "tokenizer.chat_template": CHATML,
    }
    meta.update(overrides)
    return meta


@pytest.fixture(scope="module")
def tiny():
    return Tokenizer.from_metadata(tiny_metadata())


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    return pieces + [dec.flush()]


# ---------------------------------------------------------------- hand-made vocabulary


@pytest.mark.parametrize("text", STRINGS + ["", "hello world", "<|im_end|> mid <|im_start|>"])
def test_tiny_round_trip(tiny, text):
    assert tiny.decode(tiny.encode(text)) == text


def test_tiny_merges_and_digits(tiny):
    ids = tiny.encode("hello world")
    names = [tiny.tok.id_to_token(i) for i in ids]
    assert names == ["hell", "o", "Ġw", "or", "l", "d"]
    assert len(tiny.encode("12345")) == 5
    # A "1 2" merge applies only when the pre-tokenizer keeps digit runs together (plain gpt2).
    meta = tiny_metadata()
    meta["tokenizer.ggml.merges"] = meta["tokenizer.ggml.merges"] + ["1 2"]
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + ["12"]
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [1]
    assert len(build_tokenizer(meta).encode("12").ids) == 2
    meta["tokenizer.ggml.pre"] = "gpt2"
    assert len(build_tokenizer(meta).encode("12").ids) == 1


def test_tiny_special_tokens_encode_to_one_id(tiny):
    for i, name in enumerate(SPECIALS):
        assert tiny.encode(name) == [i]
    ids = tiny.encode("a<|im_end|>b")
    assert ids[1] == 2 and len(ids) == 3


def test_tiny_eos_bos(tiny):
    assert tiny.eos_ids == frozenset({0, 1, 2})
    assert tiny.encode("he", add_bos=True) == [1, tiny.tok.token_to_id("he")]
    no_bos = Tokenizer(tiny.tok, None, frozenset(), None)
    with pytest.raises(ConfigError):
        no_bos.encode("x", add_bos=True)


def test_tiny_stream_decoder_holds_back_split_emoji(tiny):
    text = "hi 🚀 ok 世界"
    ids = tiny.encode(text)
    assert len(ids) > len(text)  # multi-byte characters are spread over several tokens
    pieces = stream(tiny, ids)
    assert "".join(pieces) == tiny.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    rocket = ids.index(tiny.tok.token_to_id(bytes_to_unicode()[0xF0]))
    assert pieces[rocket : rocket + 3] == ["", "", ""]
    assert pieces[rocket + 3] == "🚀"


def test_tiny_stream_decoder_flush_gives_up_incomplete_bytes(tiny):
    ids = tiny.encode("🚀")[:2]
    dec = tiny.stream_decoder()
    assert [dec.push(i) for i in ids] == ["", ""]
    assert dec.flush() == "\ufffd"


def test_tiny_chat_prompt(tiny):
    assert tiny.is_chatml
    assert tiny.chat_prompt("Hi") == (
        "<|im_start|>system\nYou are a tiny test model<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tiny.chat_prompt("Hi", system="Be brief.").startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    )
    plain = Tokenizer(tiny.tok, 1, frozenset({2}), "{{'<|im_start|>' + m + '<|im_end|>'}}")
    assert plain.chat_prompt("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    other = Tokenizer(tiny.tok, 1, frozenset({2}), "[INST] {{ content }} [/INST]")
    assert not other.is_chatml
    with pytest.raises(ConfigError):
        other.chat_prompt("Hi")


def test_tiny_save_and_load(tiny, tmp_path):
    path = tmp_path / "tokenizer.json"
    tiny.save(path)
    again = Tokenizer.from_file(path, bos_id=1, eos_ids=[2], chat_template=CHATML)
    for text in STRINGS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert again.encode(text) == tiny.encode(text)
    assert again.eos_ids == frozenset({2}) and again.is_chatml


def test_bad_metadata_raises_model_format_error():
    with pytest.raises(ModelFormatError, match=r"tokenizer\.ggml\.model.*'llama'"):
        build_tokenizer(tiny_metadata(**{"tokenizer.ggml.model": "llama"}))
    meta = tiny_metadata()
    del meta["tokenizer.ggml.merges"]
    with pytest.raises(ModelFormatError, match=r"tokenizer\.ggml\.merges"):
        build_tokenizer(meta)
    with pytest.raises(ModelFormatError, match=r"tokenizer\.ggml\.pre.*'qwen2'"):
        build_tokenizer(tiny_metadata(**{"tokenizer.ggml.pre": "qwen2"}))
    with pytest.raises(ModelFormatError, match=r"token_type"):
        build_tokenizer(tiny_metadata(**{"tokenizer.ggml.token_type": [1, 1]}))


def test_unreadable_tokenizer_json(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ModelFormatError):
        Tokenizer.from_file(bad)


# ---------------------------------------------------------------- the real SmolLM2 model


@pytest.fixture(scope="module")
def real(real_gguf):
    from edgesplit.runtime.gguf_model import GGUFModel

    return Tokenizer.from_metadata(GGUFModel(real_gguf).metadata)


@pytest.fixture(scope="module")
def llama_vocab(real_gguf):
    """llama.cpp's own tokenizer on the same file, when llama-cpp-python is installed."""
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(real_gguf), vocab_only=True, verbose=False)


@pytest.mark.model
def test_real_special_ids(real):
    assert real.vocab_size == 49152
    assert real.encode("<|endoftext|>") == [0]
    assert real.encode("<|im_start|>") == [1]
    assert real.encode("<|im_end|>") == [2]
    assert {0, 2} <= real.eos_ids
    assert real.is_chatml


@pytest.mark.model
@pytest.mark.parametrize("text", STRINGS)
def test_real_round_trip(real, text):
    assert real.decode(real.encode(text)) == text


@pytest.mark.model
def test_real_digits_split(real):
    assert len(real.encode("12345")) == 5


@pytest.mark.model
@pytest.mark.parametrize("text", STRINGS + ["<|im_start|>user\nHi<|im_end|>\n", "a<file_sep>"])
def test_real_ids_match_llama_cpp(real, llama_vocab, text):
    expected = llama_vocab.tokenize(text.encode(), add_bos=False, special=True)
    assert real.encode(text) == expected


@pytest.mark.model
def test_real_ids_match_llama_cpp_on_wikitext(real, llama_vocab, wikitext):
    text = wikitext.read_text(encoding="utf-8")[:20000]
    assert real.encode(text) == llama_vocab.tokenize(text.encode(), add_bos=False, special=True)


@pytest.mark.model
def test_real_chat_prompt_follows_template(real):
    prompt = real.chat_prompt("What is the capital of France?")
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = real.encode(prompt)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # three turns, two closed
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(real.chat_template)
    for system in (None, "Answer in French."):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": "Hi"}
        ]
        rendered = template.render(messages=messages, add_generation_prompt=True)
        assert real.chat_prompt("Hi", system=system) == rendered


@pytest.mark.model
@pytest.mark.parametrize("text", ["héllo 世界 🚀", "😀👍🏽 👨‍👩‍👧 done", "plain ascii text"])
def test_real_stream_decoder(real, text):
    ids = real.encode(text)
    pieces = stream(real, ids)
    assert "".join(pieces) == real.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
