"""Golden vectors of a bundle, for clients written in another language (a Kotlin app on Android).

One JSON file: the bundle's checksums (so a client knows it holds the same bundle), a prompt's
token ids, the front's hidden states at the cut for a few positions (from the bundle's LiteRT
front, with the tolerance to compare at), and every frame of one recorded greedy session -- the
device's `open`, `prefill`, `decode`s and `close`, and the worker's `token` frames -- as base64
msgpack. The session runs against the real worker's frame handling (CloudWorker.handle_frame,
no sockets) with the store the bundle was made from. A client re-running the prompt should get
the same token ids, hidden states within the tolerance, and frames equal field by field except
`session` (a fresh uuid per session) and `timing` (measured).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

from edgesplit.cloud.worker import CloudWorker
from edgesplit.device.bundle.bundle import Bundle
from edgesplit.device.remote import RemoteSegment
from edgesplit.runtime.generate import stream_generate
from edgesplit.runtime.sampling import SamplingParams
from edgesplit.runtime.store import ModelStore, sha256_file
from edgesplit.transport.channel import MemoryChannel

GOLDEN_FORMAT_VERSION = 1
POSITIONS = (0, 1, -1)  # prompt positions whose hidden states are kept (-1: the last)


def golden(store: ModelStore, bundle_dir: Path, prompt: str, max_tokens: int = 8) -> dict:
    """The golden vectors of the bundle at `bundle_dir` (made from `store`) for `prompt` (chat-wrapped)."""
    bundle = Bundle.open(bundle_dir)
    plan, tok = bundle.plan, bundle.tokenizer()
    ids = tok.encode(tok.chat_prompt(prompt))
    front = bundle.load_front(threads=1)
    hidden = front.prefill(np.array(ids, np.int64))  # (T, d)
    rows = sorted({p % len(ids) for p in POSITIONS})
    worker = CloudWorker(store, bind=None, threads=1)
    frames: list[dict] = []

    def serve(routing_id: bytes, data: bytes) -> bytes | None:
        frames.append({"from": "device", "msgpack_b64": base64.b64encode(data).decode()})
        reply = worker.handle_frame(routing_id, data)
        if reply is not None:
            frames.append({"from": "cloud", "msgpack_b64": base64.b64encode(reply).decode()})
        return reply

    front.reset()
    params = SamplingParams(seed=0)  # greedy; a fixed seed keeps the open frame the same on every run
    remote = RemoteSegment(MemoryChannel(serve), plan, params, max_tokens=max_tokens, stop_ids=tok.eos_ids,
                           codec_table=bundle.codec_table())
    tokens = [r.token for r in stream_generate([front], tok, ids, params, max_tokens=max_tokens, stop_ids=tok.eos_ids,
                                               remote=remote)]
    remote.close()
    files = bundle.manifest["files"]
    return {"format_version": GOLDEN_FORMAT_VERSION,
            "bundle": {"manifest_sha256": sha256_file(Path(bundle_dir) / "manifest.json"),
                       "files": {k: v["sha256"] for k, v in files.items()}, "plan": json.loads(plan.to_json()),
                       "weights": bundle.front["weights"]},
            "prompt": prompt, "chat_prompt": tok.chat_prompt(prompt), "prompt_ids": [int(i) for i in ids],
            "hidden_at_cut": {"positions": rows, "values": [hidden[r].tolist() for r in rows],
                              "tolerance_max_abs_over_rms": 1e-4 if bundle.front["weights"] == "f32" else 0.05},
            "tokens": tokens, "text": tok.decode(tokens),
            "frames": frames,
            "compare": "frames field by field, except `session` (a fresh uuid per session) and `timing` (measured)"}
