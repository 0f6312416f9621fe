"""Progress reaches a log that is not a terminal: lines while the work runs, JSON for machines, nothing when quiet."""

import json

import pytest

from pipeline import progress
from pipeline.progress import LogProgress, progress_bar, say, set_progress_mode


@pytest.fixture(autouse=True)
def _auto_mode():
    yield
    set_progress_mode("auto")


def test_log_lines_while_running_and_at_the_end(capsys):
    with progress_bar() as bar:  # stderr is captured: not a terminal
        assert isinstance(bar, LogProgress)
        bar.every = 0.0
        task = bar.add_task("fit", total=4)
        bar.advance(task)
        bar.advance(task, 3)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("fit 1/4 (25%)") and "left" in lines[0]
    assert lines[-1].startswith("fit 4/4 (100%)")


def test_lines_are_spaced_in_time(capsys):
    bar = LogProgress(every=3600)
    task = bar.add_task("extract", total=1000)
    for _ in range(999):
        bar.advance(task)
    assert capsys.readouterr().err == ""  # nothing before the interval, however many steps
    bar.advance(task)
    assert capsys.readouterr().err.startswith("extract 1000/1000")


def test_interrupted_task_says_where_it_stopped(capsys):
    with pytest.raises(KeyboardInterrupt), LogProgress(every=3600) as bar:
        task = bar.add_task("audit", total=10)
        bar.advance(task, 4)
        raise KeyboardInterrupt
    assert capsys.readouterr().err.startswith("audit 4/10 (40%)")


def test_json_and_quiet_modes(capsys):
    set_progress_mode("json")
    with progress_bar() as bar:
        task = bar.add_task("fit", total=2)
        bar.advance(task, 2)
    say("fold 1: kept epoch 3", fold=1, epoch=3)
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert lines[0] == {"task": "fit", "done": 2, "total": 2, "seconds": lines[0]["seconds"]}
    assert lines[1] == {"event": "fold 1: kept epoch 3", "fold": 1, "epoch": 3}
    set_progress_mode("quiet")
    with progress_bar() as bar:
        bar.advance(bar.add_task("fit", total=1))
    say("nothing")
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="progress mode must be one of auto, quiet, json, got 'loud'"):
        set_progress_mode("loud")
    assert progress.progress_mode() == "quiet"
