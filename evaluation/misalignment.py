"""The report's "intra-modal misalignment" view (Cross the Gap): every entry scored with
inverted queries beside the native entry on the same data (same task, same dataset specs).
An intra-modal task made inter-modal by inversion (image->image with OTI queries, text->text
with OVI queries, landmarks) should gain; an inter-modal one made intra-modal (zero-shot
through OTI images or OVI prompts, image-text retrieval with an inverted side) should lose."""

from __future__ import annotations

SECTIONS = ("intra_modal", "zeroshot", "retrieval")
# (section, query kind) -> (metric key, its label, the expected sign of inverted − native)
METRICS = {
    ("intra_modal", "oti"): ("mAP", "mAP", +1),
    ("intra_modal", "ovi"): ("mAP", "mAP", +1),
    ("zeroshot", "oti"): ("top1", "top-1", -1),
    ("zeroshot", "ovi"): ("top1", "top-1", -1),
    ("retrieval", "oti"): ("text_retrieval_recall@1", "I→T R@1", -1),
    ("retrieval", "ovi"): ("image_retrieval_recall@1", "T→I R@1", -1),
}


def spec_key(report: dict, name: str) -> tuple:
    described = report.get("datasets", {}).get(name, {})
    return described.get("task"), repr(sorted(described.get("specs", {}).items()))


def misalignment_rows(report: dict) -> list[dict]:
    """One row per inverted entry that has a native twin: name, native name, metric label,
    native and inverted values, and whether the change has the expected sign."""
    rows = []
    for section in SECTIONS:
        entries = report.get(section, {})
        natives = {spec_key(report, name): name for name, e in entries.items() if "query" not in e}
        for name, entry in entries.items():
            kind = entry.get("query")
            twin = natives.get(spec_key(report, name)) if kind else None
            if twin is None or (section, kind) not in METRICS:
                continue
            key, label, sign = METRICS[(section, kind)]
            native = entries[twin].get(key)
            inverted = entry.get(key)
            if native is None or inverted is None:
                continue
            rows.append(
                {
                    "name": name,
                    "native_name": twin,
                    "section": section,
                    "query": kind,
                    "metric": label,
                    "native": native,
                    "inverted": inverted,
                    "expected_sign": sign,
                    "as_expected": (inverted - native) * sign > 0,
                }
            )
    return rows
