"""Items of a JSON array, read piece by piece: ShareGPT4V's caption file is one array of about
1.2 M records (gigabytes of text), which no process should hold whole.

Each item comes out as its own JSON text, exactly as written in the file, so the stage that
streams the file parses each item only to find where it ends, and the parallel stages after it
do the real work. Pure Python on a text stream (no Ray).
"""

from __future__ import annotations

import json
import re
from typing import Iterator, TextIO

CHUNK_CHARS = 1 << 22
MAX_ITEM_CHARS = 1 << 26  # an item this long is taken for broken JSON, not read on and on
_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"
_NUMBER_CHARS = re.compile(r"[0-9.eE+-]*")


class JsonArrayError(ValueError):
    """The text is not a JSON array, or breaks off or goes wrong at `offset` (characters)."""


class _Buffer:
    """The unread text of a stream, refilled a chunk at a time."""

    def __init__(self, stream: TextIO, chunk_chars: int):
        self.stream = stream
        self.chunk_chars = chunk_chars
        self.text = ""
        self.pos = 0
        self.consumed = 0
        self.eof = False

    def refill(self) -> bool:
        """Append a chunk (dropping what was read); False at the end of the stream."""
        chunk = "" if self.eof else self.stream.read(self.chunk_chars)
        if not chunk:
            self.eof = True
            return False
        self.consumed += self.pos
        self.text, self.pos = self.text[self.pos :] + chunk, 0
        return True

    def next_char(self) -> str:
        """The next non-whitespace character, not consumed ("" at the end)."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.text) or not self.refill():
                return self.text[self.pos : self.pos + 1]

    def offset(self) -> int:
        return self.consumed + self.pos


def iter_json_array(stream: TextIO, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """The JSON text of each item of the array `stream` holds, in order; JsonArrayError when
    it holds something else or breaks off (a truncated download)."""
    buffer = _Buffer(stream, chunk_chars)
    if buffer.next_char() != "[":
        raise JsonArrayError("the file does not start with a JSON array")
    buffer.pos += 1
    if buffer.next_char() == "]":
        buffer.pos += 1
        _expect_end(buffer)
        return
    while True:
        yield _read_item(buffer)
        separator = buffer.next_char()
        buffer.pos += 1
        if separator == "]":
            _expect_end(buffer)
            return
        if separator != ",":
            raise JsonArrayError(
                f"expected ',' or ']' at character {buffer.offset() - 1}, found {separator or 'the end of the file'!r}"
            )


def _read_item(buffer: _Buffer) -> str:
    """One item's text. An item may run past the buffer (decoding fails) or be a number cut
    at the buffer's end: refill and decode again, up to MAX_ITEM_CHARS."""
    while True:
        buffer.next_char()
        start = buffer.pos
        try:
            _, end = _DECODER.raw_decode(buffer.text, start)
        except json.JSONDecodeError as error:
            if len(buffer.text) - start <= MAX_ITEM_CHARS and buffer.refill():
                continue
            raise JsonArrayError(f"broken JSON at character {buffer.consumed + error.pos}: {error.msg}") from None
        if not _may_go_on(buffer.text, start, end) or not buffer.refill():
            buffer.pos = end
            return buffer.text[start:end]  # (a refill moved the text: decode again)


def _may_go_on(text: str, start: int, end: int) -> bool:
    """Whether more text could extend the item: a number (its decoder stops at "-500" in
    "-500.") followed by nothing but number characters up to the buffer's end."""
    if text[start] not in "-0123456789":
        return False
    return _NUMBER_CHARS.match(text, end).end() == len(text)


def _expect_end(buffer: _Buffer) -> None:
    if buffer.next_char():
        raise JsonArrayError(f"text after the array's end at character {buffer.offset()}")
