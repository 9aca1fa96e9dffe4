"""The one error type for anything a peer can send us that is wrong."""

from __future__ import annotations


class ProtocolError(Exception):
    """Raised for every kind of bad remote input: size, framing, type, signature, replay.

    The transport catches exactly this type in one place, drops the message, logs
    ``reason`` and lowers the sender's score. Anything else escaping the decoder is a bug.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
