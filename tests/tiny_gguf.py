"""Write small random llama GGUF files (valid or deliberately broken) for tests that need no download.

The files are real GGUFs: llama.cpp loads the valid ones, and their tokenizer is a working
byte-level BPE ('gpt2' model, 'smollm' pre-tokenizer) with ChatML specials, like SmolLM2's.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1 (bos), 2 (eos)
# (left, right) pairs in rank order; each result is also added to the vocabulary
MERGES = [("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġ", "a"), ("Ġt", "he"), ("t", "h"),
          ("e", "r"), ("o", "n"), ("Ġ", "s"), ("Ġ", "in"), ("t", "he")]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode symbols."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_vocab(vocab: int | None = None) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token_types, merges): specials, the 256 byte symbols, merged tokens, then padding."""
    byte_syms = [bytes_to_unicode()[b] for b in range(256)]
    tokens = SPECIALS + byte_syms + [a + b for a, b in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    if vocab is not None:
        if vocab < len(tokens):
            raise ValueError(f"vocab={vocab} is smaller than the {len(tokens)} base tokens")
        pad = vocab - len(tokens)
        tokens += [f"<|pad_{i}|>" for i in range(pad)]
        types += [5] * pad  # UNUSED
    return tokens, types, [f"{a} {b}" for a, b in MERGES]


def _quantized(data: np.ndarray, qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """`data` (rows, cols) float32 in `qtype`'s bytes: (rows, bytes_per_row) uint8, or f32/f16 as is.

    Types gguf cannot quantize (K-quants, IQ*) get random bytes of the right size: such files
    exist only to be refused.
    """
    try:
        return gguf.quants.quantize(data, qtype)
    except NotImplementedError:
        byte_shape = gguf.quants.quant_shape_to_byte_shape(data.shape, qtype)
        return rng.integers(0, 256, size=byte_shape, dtype=np.uint8)


def write_tiny_gguf(path: str | os.PathLike, *, n_layers: int = 3, d_model: int = 64,
                    d_ffn: int = 128, n_heads: int = 4, n_kv_heads: int = 2,
                    vocab: int | None = None, matrix_type: str = "Q4_1", embd_type: str = "Q8_0",
                    tied: bool = True, arch: str = "llama", seed: int = 0) -> Path:
    """Write a random llama GGUF to `path` and return it as a Path.

    matrix_type: GGML type of the 7 per-layer matrices (e.g. 'Q4_1', 'Q4_0', 'Q8_0', 'F16', 'F32',
    or 'Q4_K' for a file edgesplit must refuse; K-quants need d_model and d_ffn multiples of 256).
    embd_type: type of token_embd (and output.weight when tied=False). arch: general.architecture
    and the prefix of the hyperparameter keys ('gpt2' gives a file to refuse). vocab: None for the
    natural tokenizer size (270), or a larger size padded with unused tokens.
    """
    rng = np.random.default_rng(seed)
    mtype, etype = GGMLQuantizationType[matrix_type], GGMLQuantizationType[embd_type]
    for qtype in (mtype, etype):
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if d_model % block or d_ffn % block:
            raise ValueError(f"{qtype.name} needs d_model ({d_model}) and d_ffn ({d_ffn}) to be "
                             f"multiples of its block size {block}")
    head_dim = d_model // n_heads
    tokens, types, merges = tiny_vocab(vocab)
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_name("edgesplit-tiny")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(d_ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def add(name: str, data: np.ndarray, qtype: GGMLQuantizationType) -> None:
        data = data.astype(np.float32)
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or data.ndim == 1:
            # norms stay F32, like llama.cpp's converter
            w.add_tensor(name, _quantized(data, qtype if data.ndim > 1 else GGMLQuantizationType.F32, rng))
            return
        # quantized: pass the (rows, bytes_per_row) uint8 array; the writer derives the element
        # shape from raw_dtype (raw_shape would be the byte shape, so it is left out)
        w.add_tensor(name, _quantized(data, qtype, rng), raw_dtype=qtype)

    def norm(n: int) -> np.ndarray:
        return 1.0 + 0.1 * rng.standard_normal(n)  # (n,) near 1

    def mat(rows: int, cols: int, std: float = 0.05) -> np.ndarray:
        return std * rng.standard_normal((rows, cols))  # (out, in)

    add("token_embd.weight", mat(n_vocab, d_model, 0.1), etype)
    for i in range(n_layers):
        add(f"blk.{i}.attn_norm.weight", norm(d_model), GGMLQuantizationType.F32)
        add(f"blk.{i}.attn_q.weight", mat(n_heads * head_dim, d_model), mtype)
        add(f"blk.{i}.attn_k.weight", mat(n_kv_heads * head_dim, d_model), mtype)
        add(f"blk.{i}.attn_v.weight", mat(n_kv_heads * head_dim, d_model), mtype)
        add(f"blk.{i}.attn_output.weight", mat(d_model, n_heads * head_dim), mtype)
        add(f"blk.{i}.ffn_norm.weight", norm(d_model), GGMLQuantizationType.F32)
        add(f"blk.{i}.ffn_gate.weight", mat(d_ffn, d_model), mtype)
        add(f"blk.{i}.ffn_up.weight", mat(d_ffn, d_model), mtype)
        add(f"blk.{i}.ffn_down.weight", mat(d_model, d_ffn), mtype)
    add("output_norm.weight", norm(d_model), GGMLQuantizationType.F32)
    if not tied:
        add("output.weight", mat(n_vocab, d_model, 0.1), etype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def truncate(path: str | os.PathLike, nbytes: int) -> Path:
    """Shorten the file at `path` to `nbytes` bytes (like os.truncate); a negative `nbytes`
    removes that many bytes from the end instead. Returns the path."""
    size = os.path.getsize(path)
    keep = size + nbytes if nbytes < 0 else nbytes
    if not 0 <= keep <= size:
        raise ValueError(f"{path}: cannot truncate {size} bytes to {keep}")
    os.truncate(path, keep)
    return Path(path)
