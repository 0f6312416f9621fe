"""Property-based tests (hypothesis) over the manifest and label-file parsers: whatever the bytes, the
result is either exactly the rows written or a PipelineError naming the file, never another exception."""

import csv
import io
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import PipelineError, read_labels
from pipeline.sources import load_source

cell = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
safe = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=10)
# Raw bytes (mostly not UTF-8) and text (UTF-8, with commas, quotes, newlines and the header words mixed in).
content = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(cell, st.sampled_from(["path", "id", "label", "split", ",", "\n", '"', "train", "..", "/"])),
             max_size=40).map(lambda parts: "".join(parts).encode("utf-8")),
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _csv(header: list[str], rows: list[list[str]]) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(header)
    w.writerows(rows)
    return out.getvalue()


def _manifest_ok(src) -> bool:
    return bool(src.samples) and all(s.id for s in src.samples)


def _labels_ok(task) -> bool:
    return len(task.ids) == len(set(task.ids)) > 0


@pytest.mark.parametrize("parse, name, ok", [(load_source, "m.csv", _manifest_ok), (read_labels, "labels.csv", _labels_ok)])
@SETTINGS
@given(data=content)
def test_any_bytes_parse_or_fail_cleanly(tmp_path, parse, name, ok, data):
    path = tmp_path / name
    path.write_bytes(data)
    try:
        parsed = parse(path)
    except PipelineError as e:
        assert str(path) in str(e)
    else:
        assert ok(parsed)


@SETTINGS
@given(rows=st.lists(st.tuples(safe, cell, st.sampled_from(["", "train", "val", "test"])), min_size=1, max_size=20))
def test_valid_manifests_round_trip(tmp_path, rows):
    path = tmp_path / "m.csv"
    path.write_text(_csv(["path", "label", "split"], [[f"img/{p}.jpg", lab, sp] for p, lab, sp in rows]), encoding="utf-8")
    paths = [f"img/{p}.jpg" for p, _, _ in rows]
    try:
        src = load_source(path)
    except PipelineError as e:
        assert "duplicate id" in str(e) and len(set(paths)) < len(paths)  # the only reason to refuse these
        return
    assert [(s.id, s.label, s.split) for s in src.samples] == [(p, lab.strip(), sp) for p, (_, lab, sp) in zip(paths, rows)]
    assert all(s.path == tmp_path / s.id for s in src.samples)


@SETTINGS
@given(rows=st.lists(st.tuples(safe, safe), min_size=1, max_size=20, unique_by=lambda r: r[0]))
def test_valid_label_files_round_trip(tmp_path, rows):
    path = tmp_path / "labels.csv"
    path.write_text(_csv(["id", "label"], [list(r) for r in rows]), encoding="utf-8")
    task = read_labels(path)
    assert list(task.ids) == [i for i, _ in rows] and list(task.labels) == [lab for _, lab in rows]
    assert task.splits is None
