"""Planning through Ray Data (TSV rows -> caption groups -> shard specs) against a naive
pure-Python reference written from the documented rules: same reject counts, same groups
and captions, same shard of every group, byte-identical packed specs."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest

from pipelines import build, captions, cc12m, text_input

pytestmark = pytest.mark.ray

N_ROWS = 100_000
SHARD_SIZE = 5000  # few shards: a shuffle partition each, and each costs a task
RULES = captions.CaptionRules(max_caption_chars=300)


def generated_lines(n_rows: int, seed: int = 7) -> list[bytes]:
    """A header, then CC12M-layout lines: repeated URLs with other (or the same) captions,
    malformed, bad-URL, empty, too long, non-UTF-8 and U+FFFD captions, blank and CRLF lines."""
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghij", k=rng.randint(1, 6))) for _ in range(300)]
    lines, urls = [b"url\tcaption\n"], []
    for i in range(n_rows - 1):
        caption = "  ".join(rng.choices(words, k=rng.randint(1, 12)))
        url = f"https://h{i % 13}.example.com/{i}.jpg"
        draw = rng.random()
        if draw < 0.05 and urls:  # an earlier image: another caption, or the same one again
            url = urls[rng.randrange(len(urls))]
            caption = caption if rng.random() < 0.8 else "same caption"
        urls.append(url)
        lines.append(odd_line(rng, url, caption) if draw > 0.98 else f"{url}\t{caption}\n".encode())
    return lines


def odd_line(rng: random.Random, url: str, caption: str) -> bytes:
    """One line of the kinds a real TSV holds a few of."""
    return rng.choice(
        [
            f"{url} {caption}\n".encode(),  # no tab: malformed
            f"{url}\t{caption}\tmore\n".encode(),  # three fields: malformed
            f"ftp://example.com/{caption[:5]}\t{caption}\n".encode(),  # bad URL
            f"{url}\t   \n".encode(),  # empty caption
            f"{url}\t{'w' * 400}\n".encode(),  # too long for RULES
            f"{url}\tcaf\xe9 {caption}\n".encode("latin-1"),  # not UTF-8
            f"{url}\tbroken \ufffd {caption}\n".encode(),  # U+FFFD upstream
            f"{url}\tcr\u00e9me {caption}\r\n".encode(),  # CRLF, UTF-8 accent
            f"{url}\t\u0445\u043e\u0440\u043e\u0448\u043e {caption}\n".encode(),  # Cyrillic: byte 0x85 inside
            b"   \n",  # blank: the reader drops it
        ]
    )


@pytest.fixture(scope="module")
def tsv(tmp_path_factory):
    path = tmp_path_factory.mktemp("planning") / "rows.tsv"
    path.write_bytes(b"".join(generated_lines(N_ROWS)))
    return path


def reference_plan(path, rules: captions.CaptionRules, shard_size: int, origin: str = "cc12m"):
    """(reason counts, {shard id: packed groups JSON}) by the documented rules, in plain Python:
    lines as read_text_lines splits them (Latin-1, at "\\n" only, a trailing "\\r" dropped,
    blank lines dropped), each
    decoded as UTF-8 and parsed alone; kept rows grouped by captions.group_captions; a group's
    shard is int(key[:8], 16) % ceil(groups / shard_size), the non-empty buckets numbered
    densely in order; a shard's groups sorted by key."""
    reasons, kept = Counter(), []
    for line in path.read_bytes().decode(captions.READ_ENCODING).split("\n"):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        text = captions.redecode_utf8(line)
        url, caption, reason = (
            ("", "", captions.REJECT_NON_UTF8) if text is None else captions.parse_tsv_line(text, rules)
        )
        reasons[reason] += 1
        if not reason:
            kept.append({"source": url, "caption": caption, "kind": "", "origin": origin})
    groups = captions.group_captions(kept, rules)
    num_shards = max(1, math.ceil(len(groups) / shard_size))
    by_bucket: dict[int, list[dict]] = {}
    for group in groups:  # already in key order
        by_bucket.setdefault(int(group["key"][:8], 16) % num_shards, []).append(group)
    return reasons, {i: json.dumps(by_bucket[b]) for i, b in enumerate(sorted(by_bucket))}


def ray_plan(path, rules: captions.CaptionRules, shard_size: int):
    """(reason counts, {shard id: packed groups JSON}, shard ids) from the real stages."""
    params = build.BuildParams(corpus="cc12m", shard_size=shard_size, caption_rules=rules)
    groups, reasons = build.plan_caption_groups(cc12m.read_tsv_rows([str(path)], rules, "cc12m"), params)
    specs, shard_ids = build.plan_shards(groups, params)
    packed = {int(r["shard_id"]): r["groups"] for r in specs.iter_rows()}
    return reasons, packed, shard_ids


def test_planning_matches_the_naive_reference(ray_session, tsv, monkeypatch):
    monkeypatch.setattr(text_input, "READ_CHUNK_BYTES", 1 << 19)  # several read tasks, cut mid-line
    assert len(text_input.text_chunks([str(tsv)], text_input.READ_CHUNK_BYTES)) > 3
    expected_reasons, expected = reference_plan(tsv, RULES, shard_size=SHARD_SIZE)
    reasons, packed, shard_ids = ray_plan(tsv, RULES, shard_size=SHARD_SIZE)
    assert reasons == expected_reasons
    assert {
        captions.HEADER,
        captions.REJECT_MALFORMED,
        captions.REJECT_BAD_URL,
        captions.REJECT_EMPTY_CAPTION,
        captions.REJECT_LONG_CAPTION,
        captions.REJECT_NON_UTF8,
        captions.REJECT_NON_UTF8_CAPTION,
    } < set(reasons)  # the data exercises every reason
    assert shard_ids == list(range(len(expected)))
    assert sorted(packed) == shard_ids
    assert packed == expected  # same groups, captions, shards and bytes
    groups = [g for shard in expected.values() for g in json.loads(shard)]
    assert any(len(g["captions"]) > 1 for g in groups)  # repeated URLs were merged


def test_empty_hash_buckets_get_no_shard_id(ray_session, tmp_path):
    """Two groups per shard on average: some hash buckets stay empty and are skipped."""
    path = tmp_path / "small.tsv"
    path.write_bytes(b"".join(generated_lines(60, seed=11)))
    expected_reasons, expected = reference_plan(path, RULES, shard_size=2)
    reasons, packed, shard_ids = ray_plan(path, RULES, shard_size=2)
    n_groups = sum(len(json.loads(s)) for s in expected.values())
    assert len(expected) < math.ceil(n_groups / 2)  # the hash did leave buckets empty
    assert reasons == expected_reasons
    assert shard_ids == list(range(len(expected)))
    assert packed == expected


def test_lines_are_cut_at_newlines_only_and_ranges_read_each_once(tmp_path):
    """split_lines keeps UTF-8 letters whose bytes are Latin-1 line breaks (0x85 in Cyrillic
    "х", 0x0b, 0x0c, 0x1c); byte ranges of every size give the whole file's lines once."""
    data = (
        "url\tcaption\r\nhttps://a/1.jpg\t\u0445\u043e\u0440\u043e\u0448\u043e\n\n"
        "https://a/2.jpg\tx\u000by\u001cz\n  \nlast line without newline"
    ).encode()
    lines = text_input.split_lines(data)
    assert [captions.redecode_utf8(line) for line in lines] == [
        "url\tcaption",
        "https://a/1.jpg\t\u0445\u043e\u0440\u043e\u0448\u043e",
        "https://a/2.jpg\tx\u000by\u001cz",
        "last line without newline",
    ]
    path = tmp_path / "lines.tsv"
    path.write_bytes(data)
    for size in (1, 2, 5, 17, len(data)):
        got = [
            line
            for start in range(0, len(data), size)
            for line in text_input.read_chunk_lines(str(path), start, min(start + size, len(data)))
        ]
        assert got == lines, size
    import gzip

    (tmp_path / "lines.tsv.gz").write_bytes(gzip.compress(data))
    assert text_input.read_chunk_lines(str(tmp_path / "lines.tsv.gz"), 0, -1) == lines


@pytest.mark.parametrize(
    "n_shards, n_cpus, expected",
    [
        (0, 2, 1),
        (3, 2, 1),
        (8, 2, 2),
        (9, 2, 2),
        (15, 2, 3),
        (1000, 2, build.MAX_SHARDS_PER_TASK),
        (40, 16, 1),
        (1000, 64, 7 if build.MAX_SHARDS_PER_TASK >= 7 else build.MAX_SHARDS_PER_TASK),
    ],
)
def test_shards_per_task_leave_every_cpu_two_tasks_at_least(n_shards, n_cpus, expected):
    per_task = build.shards_per_task(n_shards, n_cpus)
    assert per_task == expected
    if n_shards >= 2 * n_cpus:
        assert math.ceil(n_shards / per_task) >= 2 * n_cpus


@pytest.mark.parametrize(
    "n_shards, n_cpus", [(9, 2), (8, 2), (1, 2), (3, 4), (6, 8), (10, 4), (7, 1), (17, 16), (65, 64), (127, 64)]
)
def test_the_last_shards_are_split_so_every_cpu_gets_the_same_work(n_shards, n_cpus):
    """Against a naive list schedule of equal shard-times: with the split, the last round
    spreads evenly (the makespan is n_shards / n_cpus) whenever the parts per shard stay
    within the cap; without one, there is nothing to gain or too little."""
    n_split, n_parts = build.final_round_parts(n_shards, n_cpus)
    units = [1.0] * (n_shards - n_split) + [1.0 / n_parts] * (n_split * n_parts)
    finish = [0.0] * n_cpus
    for unit in units:
        finish[finish.index(min(finish))] += unit
    if n_split:
        assert n_parts <= build.MAX_PARTS_PER_SHARD and max(finish) == pytest.approx(n_shards / n_cpus)
    else:
        assert n_shards % n_cpus == 0 or n_cpus // math.gcd(n_shards % n_cpus, n_cpus) > build.MAX_PARTS_PER_SHARD


def test_tasks_run_whole_shards_first_and_hold_every_group_once():
    groups = {i: [{"key": f"{i}-{j:02d}"} for j in range(11)] for i in range(5)}
    tasks = [json.loads(t["task"]) for t in build.compose_tasks(groups, [0, 1, 2], [3, 4], 3, n_cpus=2)]
    assert [(t["part"], t["n_parts"], [i for i, _ in t["specs"]]) for t in tasks] == [
        (0, 1, [0, 1]),
        (0, 1, [2]),
        (0, 3, [3]),
        (1, 3, [3]),
        (2, 3, [3]),
        (0, 3, [4]),
        (1, 3, [4]),
        (2, 3, [4]),
    ]
    held = sorted(g["key"] for t in tasks for _, part in t["specs"] for g in part)
    assert held == sorted(g["key"] for shard in groups.values() for g in shard)


@pytest.mark.parametrize("n_shards, n_cpus", [(8, 2), (20, 2), (3, 2), (1, 4), (100, 16), (9, 3), (7, 1)])
def test_whole_shard_tasks_give_every_cpu_the_same_work(n_shards, n_cpus):
    """Every shard once, in order; at most MAX_SHARDS_PER_TASK a task; and a greedy list
    schedule of the tasks (Ray Data dispatching them in order) ends every CPU within one
    shard-time of the others, and all at the same time when the shards divide evenly."""
    tasks = build.whole_shard_tasks(list(range(n_shards)), n_cpus)
    assert [i for task in tasks for i in task] == list(range(n_shards))
    assert max(len(t) for t in tasks) <= build.MAX_SHARDS_PER_TASK
    finish = [0] * n_cpus
    for task in tasks:
        finish[finish.index(min(finish))] += len(task)
    assert max(finish) - min(finish) <= (0 if n_shards % n_cpus == 0 else 1)
    assert max(finish) == math.ceil(n_shards / n_cpus)
