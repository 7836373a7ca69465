"""The shared console (pipelines/console.py): stage lines, the progress reporter on a terminal
and piped to a file, and the known-noise filters (the demo's whole console is checked in
test_demo_e2e.py, which captures it)."""

from __future__ import annotations

import io
import logging

from pipelines import console, ray_setup


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_piped_prints_compact_lines_with_rate_and_eta():
    out = io.StringIO()
    with console.Progress("train", 40, "step", every_s=0, stream=out) as progress:
        for step in (20, 40):
            progress.set(step, loss=2.3125)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert lines[0].startswith("train  step 20/40   50%  loss 2.312  ") and "steps/s  eta " in lines[0]
    assert lines[1].endswith("eta done")


def test_progress_rate_counts_from_the_first_update_not_the_start_up(monkeypatch):
    clock = iter([0.0, 100.0, 100.0, 110.0, 110.0, 110.0])  # 100 s of start-up, then 10 steps in 10 s
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    progress = console.Progress("train", 30, "step", every_s=0, stream=out)
    progress.set(10)
    progress.set(20)
    assert "1 steps/s  eta 10s" in out.getvalue().splitlines()[-1]


def test_progress_piped_throttles_to_one_line_per_interval_plus_the_last():
    out = io.StringIO()
    with console.Progress("prepare", 100, "shard", every_s=3600, stream=out) as progress:
        for _ in range(99):
            progress.update()
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]
    assert "shard 99/100" in out.getvalue()


def test_progress_on_a_terminal_redraws_one_bar_in_place():
    out = FakeTerminal()
    with console.Progress("encode images", 10, "image", stream=out) as progress:
        for _ in range(10):
            progress.update()
    text = out.getvalue()
    assert text.count("\r") == 10 and text.endswith("\n") and text.count("\n") == 1
    assert "[####################]  image 10/10  100%" in text.split("\r")[-1]


def test_stage_lines_name_the_stage_and_its_elapsed_time():
    out = io.StringIO()
    with console.stage("prepare/plan", "caption groups", stream=out):
        pass
    assert out.getvalue().splitlines() == ["==> prepare/plan  caption groups", "<== prepare/plan done in 0s"]


def test_known_noise_is_dropped_and_other_warnings_kept(caplog):
    ray_setup.quiet_ray_logs(verbose=False)
    name, fragment = ray_setup.KNOWN_NOISE[0]
    logger = logging.getLogger(name)
    logger.propagate, was = True, logger.propagate
    try:
        with caplog.at_level(logging.WARNING):
            logger.warning(fragment + ". State API may be temporarily unavailable.")
            logger.warning("Failed to clean up placement group: boom")
    finally:
        logger.propagate = was
    assert [r.getMessage() for r in caplog.records] == ["Failed to clean up placement group: boom"]


def test_format_duration():
    assert [console.format_duration(s) for s in (4.4, 90, 3720)] == ["4s", "1m30s", "1h02m"]
