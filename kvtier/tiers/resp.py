"""A RESP2 reply reader for the Redis tier's loads: bulk values land straight in host slots.

Only what a pipelined batch of GETs needs: array and bulk-string replies, error replies, and
skipping values of an unexpected size. Anything else raises ReplyError, and the caller drops the
connection rather than reuse it in an unknown state.
"""

from __future__ import annotations

from typing import Any

_READ = 64 << 10  # socket read size for reply headers and skipped values


class ReplyError(Exception):
    """A reply that does not fit the command sent; the connection is dropped."""


class LoadRetry(Exception):
    """A load failed before any reply arrived, on a connection the server may have dropped."""


class Replies:
    """RESP2 replies read from one socket; bulk values of the expected size land in place."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._pending = bytearray()  # received, not yet parsed
        self._scratch = bytearray(_READ)
        self.received = 0  # bytes read from the socket so far

    def _recv(self, into: memoryview) -> int:
        n = int(self._sock.recv_into(into))
        if n == 0:
            raise ConnectionError("connection closed by the server")
        self.received += n
        return n

    def _more(self) -> None:
        n = self._recv(memoryview(self._scratch))
        self._pending += memoryview(self._scratch)[:n]

    def line(self) -> bytes:
        while True:
            end = self._pending.find(b"\r\n")
            if end >= 0:
                out = bytes(self._pending[:end])
                del self._pending[: end + 2]
                return out
            if len(self._pending) > _READ:
                raise ReplyError("reply header longer than 64 KiB")
            self._more()

    def array(self) -> int:
        head = self.line()
        if head[:1] == b"-":
            raise ReplyError(head[1:].decode(errors="replace"))
        if head[:1] != b"*":
            raise ReplyError(f"expected an array reply, got {head[:40]!r}")
        return int(head[1:])

    def value_into(self, buf: memoryview) -> int | str:
        """Read one reply to a GET. A value of exactly len(buf) bytes is written into `buf`;
        one of any other length is skipped. Returns the value's length (-1: no such key), or
        the text of an error reply."""
        head = self.line()
        kind = head[:1]
        if kind == b"-":
            return head[1:].decode(errors="replace")
        if kind != b"$":
            raise ReplyError(f"expected a bulk reply, got {head[:40]!r}")
        size = int(head[1:])
        if size < 0:
            return -1
        if size != len(buf):
            self._skip(size + 2)
            return size
        done = min(size, len(self._pending))
        buf[:done] = self._pending[:done]
        del self._pending[:done]
        while done < size:
            done += self._recv(buf[done:])
        while len(self._pending) < 2:
            self._more()
        if self._pending[:2] != b"\r\n":
            raise ReplyError("bulk value not followed by CRLF")
        del self._pending[:2]
        return size

    def _skip(self, nbytes: int) -> None:
        drop = min(nbytes, len(self._pending))
        del self._pending[:drop]
        nbytes -= drop
        view = memoryview(self._scratch)
        while nbytes > 0:
            nbytes -= self._recv(view[: min(nbytes, len(view))])
