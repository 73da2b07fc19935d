"""What a split session sent and received: enough to rebuild it on another cloud worker.

A session's state on the cloud is its KV cache, its repetition history and its sampler position.
All three follow from what the device sent (the open frame with a concrete seed, the prefill and
decode frames with their compressed activations, at explicit sequence numbers = positions) and the
tokens that came back. Replaying the frames in order on a fresh worker, one step each as the
original session ran them, rebuilds the same KV cache and draws the same tokens (token n's draw
depends on (seed, n) only), so the device can check every replayed token against the log.

The log keeps the prompt and token ids too, so a later re-split (a new cut mid-session) can
recompute the hidden states at another cut from the same log.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from edgesplit.transport.protocol import DecodeFrame, OpenFrame, PrefillFrame


@dataclass
class ReplayLog:
    """One session: its open frame, the activation frames in seq order, and the tokens received
    (tokens[i] answered frames[i])."""

    open: OpenFrame
    frames: list[PrefillFrame | DecodeFrame] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def record(self, frame: PrefillFrame | DecodeFrame) -> None:
        """A frame about to be sent; its seq must follow the last one (positions stay explicit)."""
        want = len(self.frames) + 1
        if frame.seq != want:
            raise ValueError(f"replay log: frame seq {frame.seq} does not follow {want - 1}")
        self.frames.append(frame)

    def answered(self, token: int) -> None:
        """The token that answered the last recorded frame."""
        if len(self.tokens) >= len(self.frames):
            raise ValueError("replay log: a token with no frame to answer")
        self.tokens.append(int(token))

    def for_session(self, session: str) -> tuple[OpenFrame, list[PrefillFrame | DecodeFrame]]:
        """The open frame and every recorded frame re-addressed to `session` (same seqs, same blobs)."""
        return (dataclasses.replace(self.open, session=session),
                [dataclasses.replace(f, session=session) for f in self.frames])

    @property
    def nbytes(self) -> int:
        """Bytes of activation blobs held (what the log costs the device's memory)."""
        return sum(len(f.tensor.data) for f in self.frames)
