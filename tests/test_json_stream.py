"""The streaming JSON array reader against json.loads, at every chunk size."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.json_stream import JsonArrayError, iter_json_array

RECORDS = [
    {
        "id": "000001",
        "image": "sam/images/a.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe [the] image, {briefly}."},
            {"from": "gpt", "value": 'A "quoted" caption, with ] and } and \u00e9.'},
        ],
    },
    12345,
    -0.5e3,
    "text",
    [1, [2, []]],
    {},
    None,
    True,
]


def items(text: str, chunk: int) -> list:
    return [json.loads(t) for t in iter_json_array(io.StringIO(text), chunk_chars=chunk)]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
@pytest.mark.parametrize("indent", [None, 2])
def test_items_are_those_json_loads_reads(chunk, indent):
    text = json.dumps(RECORDS, indent=indent)
    assert items(text, chunk) == RECORDS
    texts = list(iter_json_array(io.StringIO(text), chunk_chars=chunk))
    assert texts == [
        json.dumps(r, indent=indent).replace("\n", "\n  ") if indent else json.dumps(r) for r in RECORDS
    ]  # each item's own text, as written


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=8),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
            max_leaves=8,
        ),
        max_size=8,
    ),
    st.integers(1, 9),
)
def test_any_array_at_any_chunk_size(values, chunk):
    assert items(json.dumps(values), chunk) == values


@pytest.mark.parametrize("text", ["[]", " [ ] \n", "\n[\n]"])
def test_empty_arrays(text):
    assert items(text, 1) == []


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"a": 1}', "does not start with a JSON array"),
        ("", "does not start with a JSON array"),
        ('[{"a": 1}, {"b": ', "broken JSON"),  # a truncated download
        ('[{"a": 1} {"b": 2}]', "expected ',' or ']'"),
        ("[1, 2", "expected ',' or ']'"),
        ("[1, 2] 3", "text after the array"),
        ("[1, nope]", "broken JSON at character 4"),
    ],
)
def test_broken_input_is_a_clear_error(text, match):
    with pytest.raises(JsonArrayError, match=match):
        items(text, 3)


def test_items_come_out_before_the_stream_ends():
    """Streaming: the first item is out after reading about one chunk, not the whole file."""

    class Counting(io.StringIO):
        read_chars = 0

        def read(self, n=-1):
            out = super().read(n)
            self.read_chars += len(out)
            return out

    stream = Counting(json.dumps([{"caption": "x" * 100}] * 10_000))
    first = next(iter_json_array(stream, chunk_chars=4096))
    assert json.loads(first) == {"caption": "x" * 100} and stream.read_chars <= 2 * 4096
