"""A connection's write buffer: what is queued, what the socket has not taken yet.

One mechanism for both of the I/O thread's connections and the blocking client.
Bytes are appended as frames are made; `flush` sends as much as the socket takes
now. Small frames (acks are 21 bytes) are joined into one send; a partly sent
buffer is resumed through a memoryview offset, so a large body is never re-sliced
or copied again per call (the old per-call `data[sent:]` was quadratic for a body
written in many partial sends). Only the thread that owns the connection calls it.
"""

from __future__ import annotations

from collections.abc import Callable


class Outbox:
    __slots__ = ("_chunks", "_head", "_offset", "size")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []  # queued, not yet started
        self._head = b""  # the buffer being sent, from _offset on
        self._offset = 0
        self.size = 0  # bytes not yet taken by the socket

    def __bool__(self) -> bool:
        return self.size > 0

    def write(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self.size += len(data)

    def flush(self, send: Callable[[memoryview], int]) -> int:
        """Send what the socket takes now via `send` (returns bytes taken, 0 if full); returns the total sent."""
        total = 0
        while self.size:
            if self._offset >= len(self._head):
                chunks = self._chunks
                self._head = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._chunks = []
                self._offset = 0
            sent = send(memoryview(self._head)[self._offset :])
            if not sent:
                break
            self._offset += sent
            self.size -= sent
            total += sent
        if self._offset >= len(self._head) and self._head:
            self._head, self._offset = b"", 0
        return total

    def clear(self) -> None:
        self._chunks, self._head, self._offset, self.size = [], b"", 0, 0
