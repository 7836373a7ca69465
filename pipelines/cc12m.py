"""The CC12M reader (or any TSV of `url<TAB>caption`, one row per caption): lines -> caption
rows, parsed where they are read. The YFCC15M and ShareGPT4V readers are `yfcc.py` and
`sharegpt4v.py`; all three feed the one shared pipeline, `build.py`."""

from __future__ import annotations

from pipelines import captions, text_input


class ParseTsvRows:
    """CC12M reader stage: TSV lines (read as Latin-1) -> caption rows."""

    def __init__(self, rules: captions.CaptionRules, origin: str):
        self.rules = rules
        self.origin = origin

    def __call__(self, batch: dict) -> dict:
        return captions.rows_to_columns([self.parse(line) for line in batch["text"]])

    def parse(self, line: str) -> dict:
        text = captions.redecode_utf8(line)
        if text is None:
            return {"reason": captions.REJECT_NON_UTF8}
        url, caption, reason = captions.parse_tsv_line(text, self.rules)
        return {"source": url, "caption": caption, "origin": self.origin, "reason": reason}


def parse_tsv_batch(batch: dict, rules: captions.CaptionRules, origin: str) -> dict:
    """ParseTsvRows as a plain task function (fn_kwargs): Ray Data runs it on every CPU,
    where a class would need an actor pool."""
    return ParseTsvRows(rules, origin)(batch)


def read_tsv_rows(uris: list[str], rules: captions.CaptionRules, origin: str):
    """The CC12M reader: `url<TAB>caption` lines -> caption rows, parsed where they are read."""
    return text_input.read_text_lines(uris).map_batches(
        parse_tsv_batch, fn_kwargs={"rules": rules, "origin": origin}, batch_format="numpy"
    )
