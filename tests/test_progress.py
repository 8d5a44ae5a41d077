"""distcls.progress: done / total, rate, ETA; a line every N seconds in a log, one live line on a terminal."""

import io

from distcls.progress import Progress, format_duration


class Clock:
    """Seconds that move only when the test says so."""

    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_every_n_seconds_with_rate_and_eta():
    clock, out, seen = Clock(), io.StringIO(), []
    p = Progress("label", total=1000, unit="images", every_s=10, stream=out, clock=clock, on_report=seen.append)
    for _ in range(25):  # 10 images per second for 25 s: lines at 10 s and 20 s
        clock.t += 1
        p.add(10)
    lines = out.getvalue().splitlines()
    assert lines == [
        "label: 100/1,000 images (10.0%), 10.0 images/s, ETA 1m30s",
        "label: 200/1,000 images (20.0%), 10.0 images/s, ETA 1m20s",
    ]
    assert [s["done"] for s in seen] == [100, 200] and seen[-1]["eta_s"] == 80
    p.close()
    assert out.getvalue().splitlines()[-1] == "label: 250/1,000 images (25.0%), 10.0 images/s, ETA 1m15s"


def test_the_rate_follows_the_last_window_not_the_start_up():
    clock = Clock()
    p = Progress("x", total=10_000, window_s=20, stream=io.StringIO(), clock=clock)
    clock.t += 60  # a minute of start-up with nothing done
    p.add(0)
    for _ in range(30):
        clock.t += 1
        p.add(50)
    assert p.rate() == 50 and p.snapshot()["eta_s"] == (10_000 - 1500) / 50


def test_a_terminal_gets_one_live_line_and_unknown_totals_have_no_eta():
    clock, out = Clock(), Terminal()
    p = Progress("pack", unit="shards", tty_every_s=0.5, stream=out, clock=clock)
    for _ in range(4):
        clock.t += 0.5
        p.add(1)
    p.close()
    text = out.getvalue()
    assert text.count("\r\x1b[2K") == 5 and text.endswith("pack: 4 shards, 2.0 shards/s, ETA ?\n") and text.count("\n") == 1


def test_resumed_work_counts_in_done_not_in_the_rate_and_disabled_prints_nothing():
    clock, out, seen = Clock(), io.StringIO(), []
    p = Progress("pack", total=10, unit="shards", done=6, stream=out, clock=clock, enabled=False, on_report=seen.append)
    clock.t += 4
    p.add(2)
    p.close()
    assert out.getvalue() == "" and seen[-1]["done"] == 8 and seen[-1]["rate"] == 0.5 and seen[-1]["eta_s"] == 4


def test_format_duration():
    assert [format_duration(s) for s in (None, -1, 0, 59.4, 61, 3600 + 125)] == ["?", "?", "0s", "59s", "1m01s", "1h02m"]
