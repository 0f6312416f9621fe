"""The prediction service, as a client sees it: a server subprocess on a free loopback port, a real HTTP
client (httpx). It answers what `predict` answers, shares forward passes between requests that arrive
together, refuses corrupt and oversized uploads without going down, and stops cleanly on SIGTERM."""

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import make_image
from pipeline import LoadedModel, PipelineError, RunFolder, predict

httpx = pytest.importorskip("httpx", reason="the test extra installs httpx")
pytest.importorskip("fastapi", reason="the serve extra installs fastapi")

MAX_BYTES = 2_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``pipeline serve`` in a subprocess, its output in a log file."""

    def __init__(self, run: Path, weights_dir: Path, log: Path, port: int | None = None, *args: str):
        self.port, self.log = port or free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "serve", str(run), "--port", str(self.port), *args],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PIPELINE_WEIGHTS_DIR": str(weights_dir)})

    def wait_ready(self, timeout: float = 120) -> "Server":
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError(f"the server did not start in {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health").json()


@pytest.fixture(scope="module")
def logreg(tiny_run) -> tuple[int, Path]:
    """The run's logreg row (counted from 1) and its head: probabilities between 0 and 1 to compare."""
    rows = RunFolder(tiny_run["run"]).rows()
    k = next(k for k, r in enumerate(rows) if r.head == "logreg")
    return k + 1, tiny_run["run"] / rows[k].head_file


@pytest.fixture(scope="module")
def server(tiny_run, logreg, tiny_weights_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = Server(tiny_run["run"], tiny_weights_dir, log, None, "--row", str(logreg[0]), "--max-bytes", str(MAX_BYTES),
                 "--max-wait-ms", "300").wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """New images (in no cache) from red to blue, so the probabilities are not all 0 or 1."""
    folder = tmp_path_factory.mktemp("new")
    return [make_image(folder / f"mix{i}.jpg", (200 - 30 * i, 50, 40 + 30 * i), 900 + i) for i in range(6)]


def _post(url: str, paths: list[Path]) -> httpx.Response:
    return httpx.post(f"{url}/predict", files=[("file", (p.name, p.read_bytes())) for p in paths], timeout=60)


def _same_rows(got: list[dict], expected: list[dict]) -> None:
    assert [g["path"] for g in got] == [Path(e["path"]).name for e in expected]
    assert [(g["prediction"], g["error"]) for g in got] == [(e["prediction"], e["error"]) for e in expected]
    for g, e in zip(got, expected):
        assert set(g) == set(e) | {"ood_score", "ood"}  # a run folder's model says how unlike its training data
        assert {k: v for k, v in g.items() if k.startswith("prob_")} == \
            pytest.approx({k: v for k, v in e.items() if k.startswith("prob_")}, abs=1e-6)


def test_answers_what_predict_answers(server, logreg, images):
    expected = predict(logreg[1], images, workers=0, progress=False)
    assert len({round(e["prob_red"], 3) for e in expected}) > 2  # a comparison of more than 0s and 1s
    r = _post(server.url, images)
    assert r.status_code == 200, r.text
    _same_rows(r.json(), expected)


def test_requests_arriving_together_share_a_forward_pass(server, logreg, images):
    expected = {Path(e["path"]).name: e for e in predict(logreg[1], images, workers=0, progress=False)}
    before = server.health()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda k: _post(server.url, [images[k % len(images)]]), range(8)))
    after = server.health()
    assert [a.status_code for a in answers] == [200] * 8
    for k, a in enumerate(answers):
        _same_rows(a.json(), [expected[images[k % len(images)].name]])
    assert after["requests"] - before["requests"] == 8 and after["images"] - before["images"] == 8
    assert after["forward_passes"] - before["forward_passes"] < 8


def test_a_corrupt_upload_is_refused_with_its_reason_and_the_service_lives_on(server, images, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"this is not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    r = _post(server.url, [images[0], tmp_path / "broken.jpg", tmp_path / "empty.png"])
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert [d["file"] for d in detail] == ["broken.jpg", "empty.png"]
    assert "not an image Pillow can read" in detail[0]["error"] and "0 bytes" in detail[1]["error"]
    assert _post(server.url, [images[0]]).status_code == 200
    missing = httpx.post(f"{server.url}/predict", data={"other": "x"})
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "file"]


def test_an_oversized_request_is_refused_with_413(server, images):
    big = os.urandom(MAX_BYTES + 1)
    r = httpx.post(f"{server.url}/predict", files=[("file", ("big.jpg", big))], timeout=60)
    assert r.status_code == 413 and f"at most {MAX_BYTES:,}" in r.json()["detail"]

    def chunks():  # a well-formed upload with no Content-Length: refused as its bytes arrive
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n'
        for _ in range(MAX_BYTES // 65536 + 2):
            yield os.urandom(65536)
        yield b"\r\n--xyz--\r\n"

    r = httpx.post(f"{server.url}/predict", content=chunks(), timeout=60,
                   headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413
    assert _post(server.url, [images[0]]).status_code == 200


def test_model_says_which_row_protocol_and_spec_it_serves(server, tiny_run, logreg):
    run = RunFolder(tiny_run["run"])
    served = run.rows()[logreg[0] - 1]
    about = httpx.get(f"{server.url}/model").json()
    assert (about["row"]["head"], about["row"]["task"], about["row"]["accuracy"]) == ("logreg", served.task, served.score)
    assert about["protocol"]["id"] == served.protocol == run.protocol(served.task).id
    assert [s["key"] for s in about["feature_specs"]] == [served.spec]
    assert about["classes"] == ["blue", "red"] and about["serving"]["max_bytes"] == MAX_BYTES
    assert f"Uvicorn running on http://127.0.0.1:{server.port}" in server.log.read_text()  # loopback by default


@pytest.mark.slow
def test_sigterm_stops_it_cleanly_and_it_starts_again_on_the_same_port(tiny_run, tiny_weights_dir, tmp_path, images):
    first = Server(tiny_run["run"], tiny_weights_dir, tmp_path / "first.log").wait_ready()
    assert httpx.get(f"{first.url}/model").json()["row"]["head"] == RunFolder(tiny_run["run"]).best_row().head
    assert _post(first.url, images[:2]).status_code == 200
    code = first.stop()
    assert code in (0, -signal.SIGTERM), first.log.read_text()  # uvicorn re-raises the signal once shut down
    assert "Application shutdown complete" in first.log.read_text()
    again = Server(tiny_run["run"], tiny_weights_dir, tmp_path / "again.log", first.port).wait_ready()
    try:
        assert _post(again.url, images[:2]).status_code == 200
    finally:
        again.stop()


def test_row_and_task_pick_the_model(tiny_run):
    rows = RunFolder(tiny_run["run"]).rows()
    assert LoadedModel(tiny_run["run"], row=2).model.row.head == rows[1].head
    with pytest.raises(PipelineError, match=rf"--row must be in \[1, {len(rows)}\], got 0"):
        LoadedModel(tiny_run["run"], row=0)
    with pytest.raises(PipelineError, match="not 'other'; give --row or --task"):
        LoadedModel(tiny_run["run"], row=1, task="other")
    with pytest.raises(PipelineError, match="--row picks a row of a fit run folder"):
        LoadedModel(tiny_run["run"] / rows[0].head_file, row=1)


def test_without_the_serve_extra_the_error_names_it(tiny_run, monkeypatch):
    from pipeline.stages.serve import create_app

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    with pytest.raises(PipelineError, match=r"serve needs fastapi: pip install -e '\.\[serve\]'"):
        create_app(tiny_run["run"])


def test_a_busy_port_fails_at_once_before_the_model_loads(tiny_run, tiny_weights_dir, tmp_path, monkeypatch):
    from pipeline.stages import serve as serve_module

    loaded = []
    monkeypatch.setattr(serve_module, "create_app", lambda *a, **k: loaded.append(a))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(PipelineError, match=f"cannot listen on 127.0.0.1:{port}: .*choose another --port"):
            serve_module.serve(tiny_run["run"], port=port)
    assert loaded == []
