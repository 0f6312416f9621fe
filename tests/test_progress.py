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


def test_under_log_json_every_line_on_stderr_is_json(capsys):
    import logging
    import warnings

    from pipeline.progress import tell

    plain = warnings.showwarning
    set_progress_mode("json")
    try:
        tell("note", "1 row(s) already in runs/x", rows=1)
        warnings.warn("the loss still improved")
        logging.getLogger("somelib").warning("disk %s is slow", "sda")
        logging.getLogger("somelib").info("not shown: below the root's level")
    finally:
        set_progress_mode("auto")
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert lines[0] == {"level": "note", "message": "1 row(s) already in runs/x", "rows": 1}
    assert lines[1]["level"] == "warning" and lines[1]["message"] == "the loss still improved"
    assert lines[1]["category"] == "UserWarning" and lines[1]["source"].startswith(__file__)
    assert lines[2] == {"level": "warning", "message": "disk sda is slow", "logger": "somelib"}
    assert len(lines) == 3 and warnings.showwarning is plain  # plain again once the mode is not json
    tell("note", "plain")
    tell("", "a bare line")
    assert capsys.readouterr().err == "note: plain\na bare line\n"


def test_cli_errors_are_json_under_log_json(tmp_path):
    from conftest import run_cli

    r = run_cli("--log-json", "fit", str(tmp_path / "missing"), "--out", str(tmp_path / "run"))
    assert r.returncode == 1
    [line] = [json.loads(x) for x in r.stderr.splitlines()]
    assert line["level"] == "error" and "missing" in line["message"]
