"""Progress output: a tqdm bar on a terminal, a few plain lines in a log file or pipe."""

import io

from minilora.io.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_pipe_gets_one_plain_line_per_5_percent_and_no_carriage_returns():
    out = io.StringIO()
    bar = Progress(1000, "train", stream=out, every_seconds=0, unit="steps")
    for step in range(1000):
        bar.update(1, loss=f"{1 / (step + 1):.4f}", lr="1.00e-03")
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert len(lines) == 20  # every 50 steps, the last one at 1000/1000
    assert lines[0].startswith("train: 50/1000 steps (5%)  loss 0.0200  lr 1.00e-03  ")
    assert lines[-1].startswith("train: 1000/1000 steps (100%)  loss 0.0010")
    assert all(len(line) < 200 for line in lines)


def test_a_pipe_waits_every_seconds_between_lines_and_always_reports_the_end():
    out = io.StringIO()
    with Progress(1000, "eval", stream=out, every_seconds=3600) as bar:
        for _ in range(1000):
            bar.update(1)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert out.getvalue().startswith("eval: 1000/1000 it (100%)  ")


def test_resumed_progress_counts_from_its_initial_step():
    out = io.StringIO()
    with Progress(100, "train", initial=40, stream=out, every_seconds=0) as bar:
        bar.update(10)
    assert out.getvalue().startswith("train: 50/100 it (50%)")


def test_a_terminal_gets_tqdm_and_a_disabled_bar_writes_nothing():
    tty = Terminal()
    with Progress(10, "train", stream=tty) as bar:
        for _ in range(10):
            bar.update(1, loss="0.5")
    assert "\r" in tty.getvalue() and "10/10" in tty.getvalue() and "loss=0.5" in tty.getvalue()

    quiet = io.StringIO()
    with Progress(10, "train", stream=quiet, enabled=False, every_seconds=0) as bar:
        for _ in range(10):
            bar.update(1)
    assert quiet.getvalue() == ""
