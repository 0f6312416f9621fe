"""Folds that keep copies apart: a label file's ``group`` column and groups given when a protocol is decided
(near-copies) keep each group in one fold and are recorded in the protocol; a task without groups keeps
exactly the folds it had; a held-out split is kept as given, and the scored images set aside (leaked,
suspect labels) give each row a clean score and the leaderboard a check that its ranking holds."""

import numpy as np
import pytest

from pipeline import PipelineError, RunFolder, fit, load_task, read_labels
from pipeline.evaluation import Labelled, Protocol, clean_ranking, join_groups, open_task, score_row
from pipeline.kinds import get_kind

N = 30


def _task(kind: str, split: bool = False, groups=None) -> Labelled:
    """The generated task whose protocols (without groups) were recorded before groups existed."""
    rng = np.random.default_rng(3)
    ids = np.array([f"s{i:03d}" for i in rng.permutation(N)], dtype=object)
    classes = np.array(list("abc"))[rng.integers(0, 3, N)].astype(object)
    tags = get_kind("multilabel").parse(["|".join(t for t in "xyz" if rng.random() < .5) or "x" for _ in range(N)],
                                        ["generated"] * N)
    y = {"classification": classes, "multilabel": tags, "regression": rng.normal(size=N)}[kind]
    splits = np.array(["train"] * 20 + ["val"] * 10 if split else [""] * N, dtype=object)
    return Labelled("t", kind, ids, y, splits, groups)


def _wrong(y: np.ndarray) -> np.ndarray:
    """Another of the classes a, b, c than each of ``y``."""
    return np.array([{"a": "b", "b": "c", "c": "a"}[v] for v in y], dtype=object)


# the ids decide() gave these tasks before groups existed (git 74249c5)
BEFORE = {("classification", False): "a098eecb5617", ("classification", True): "9a2b5ab7b9ec",
          ("multilabel", False): "d8a0c4a5961e", ("multilabel", True): "3e8741a25693",
          ("regression", False): "64d30e61b005", ("regression", True): "45b596e155d5"}


@pytest.mark.parametrize("kind,split", list(BEFORE))
def test_a_task_without_groups_keeps_its_protocol(kind, split):
    """Same ids (so the same folds, seed and images) as before groups existed, with no group column, an
    all-empty one, or extra groups in which no two samples share one."""
    assert _task(kind, split).decide(5, 0).id == BEFORE[kind, split]
    assert _task(kind, split, np.full(N, "", dtype=object)).decide(5, 0).id == BEFORE[kind, split]
    assert _task(kind, split).decide(5, 0, np.full(N, -1)).id == BEFORE[kind, split]
    assert _task(kind, split).decide(5, 0, np.arange(N)).groups is None


def test_join_groups_merges_groupings_and_numbers_them_in_sample_order():
    labels = np.array(["p1", "", "p2", "p1", "", "p3"], dtype=object)
    copies = np.array([-1, 7, 7, -1, -1, 9])  # sample 1 copies sample 2 (of p2); sample 5 alone in copies
    assert join_groups(labels).tolist() == [0, -1, -1, 0, -1, -1]
    assert join_groups(labels, copies).tolist() == [0, 1, 1, 0, -1, -1]
    assert join_groups(copies, None).tolist() == [-1, 0, 0, -1, -1, -1]
    assert join_groups(np.array([3, 3, 1, 1]), np.array([-1, 5, 5, -1])).tolist() == [0, 0, 0, 0]  # a chain
    assert join_groups(None, np.full(4, -1)) is None
    with pytest.raises(PipelineError, match="groups of 3 samples given for 6 samples"):
        join_groups(labels, np.zeros(3, int))


@pytest.mark.parametrize("kind", ["classification", "multilabel", "regression"])
def test_each_group_is_scored_in_one_fold(kind):
    """Label-file groups of 3 and extra (near-copy) groups that join two of them: every joined group in one
    fold, the folds differ from the ungrouped ones, and the groups are recorded in the protocol's id."""
    names = np.array([f"obj{i // 3}" for i in range(N)], dtype=object)
    names[::7] = ""
    copies = np.full(N, -1)
    copies[[1, 4, 29]] = 0  # joins obj0, obj1 and obj9
    protocol = _task(kind, groups=names).decide(5, 0, copies)
    order = {sid: k for k, sid in enumerate(protocol.ids)}
    ids = _task(kind).ids
    fold_of = np.array([protocol.folds[order[i]] for i in ids])
    for g in set(names) - {""}:
        assert len(set(fold_of[names == g])) == 1, g
    assert len({fold_of[1], fold_of[4], fold_of[29]}) == 1
    assert sorted(set(protocol.folds)) == [0, 1, 2, 3, 4]
    assert protocol.id != BEFORE[kind, False]
    assert not np.array_equal(protocol.folds, _task(kind).decide(5, 0).folds)
    joined = [protocol.groups[order[i]] for i in (ids[1], ids[2], ids[3], ids[27])]
    assert len(set(joined)) == 1 and joined[0] >= 0


def test_stratified_group_folds_keep_classes_in_proportion():
    rng = np.random.default_rng(0)
    n = 300
    y = np.array(["a"] * 200 + ["b"] * 100, dtype=object)
    groups = np.array([f"g{i // 3}" for i in range(n)], dtype=object)
    labelled = Labelled("t", "classification", np.array([f"i{k:03d}" for k in rng.permutation(n)], dtype=object),
                        y, np.full(n, "", dtype=object), groups)
    protocol = labelled.decide(5, 1)
    share = [np.mean(protocol.y[protocol.folds == f] == "b") for f in range(5)]
    assert max(abs(s - 1 / 3) for s in share) < 0.05, share


def test_too_few_groups_for_the_folds_are_refused():
    with pytest.raises(PipelineError, match="its 4 groups of images .* cannot fill 5 folds"):
        _task("regression").decide(5, 0, np.arange(N) % 4)


def test_extra_groups_are_recorded_and_checked_when_a_run_is_reopened(tmp_path):
    """The route for near-copies: ``open_task(..., groups=)``; the saved protocol holds them, and the run
    refuses other groups under ``exact`` as it refuses other folds; ``within`` keeps the run's."""
    run = RunFolder(tmp_path / "run")
    copies = np.full(N, -1)
    copies[[2, 5, 11]] = 4
    first, note = open_task(_task("classification"), 5, 0, run, groups=copies)
    assert note == "" and first.groups is not None
    run.save_protocol(first)
    again = RunFolder(tmp_path / "run").protocol("t")
    assert again.id == first.id and np.array_equal(again.groups, first.groups)
    assert open_task(_task("classification"), 5, 0, run, groups=copies)[0].id == first.id
    with pytest.raises(PipelineError, match="groups 1 -> 0"):
        open_task(_task("classification"), 5, 0, run)
    other = copies.copy()
    other[[2, 6]] = [-1, 4]
    with pytest.raises(PipelineError, match="the labels, the images or their groups differ"):
        open_task(_task("classification"), 5, 0, run, groups=other)
    within, _ = open_task(_task("classification"), 5, 0, run, "within")
    assert within.id == first.id


def test_a_split_is_kept_and_its_leaked_groups_are_set_aside():
    """Groups across train and val: the split is the user's, a note says so, and the val images of those
    groups are left out of each row's clean score."""
    names = np.full(N, "", dtype=object)
    names[[0, 25]] = "dog"  # train and val
    names[[21, 22]] = "cat"  # both val
    labelled = _task("classification", split=True, groups=names)
    protocol, note = open_task(labelled, 5, 0)
    assert protocol.eval == "val" and protocol.id != BEFORE["classification", True]
    assert np.array_equal(protocol.folds, _task("classification", split=True).decide(5, 0).folds)
    leaked = list(np.flatnonzero(np.isin(protocol.ids, labelled.ids[[25]])))
    assert list(protocol.across()) == leaked and list(np.flatnonzero(protocol.aside)) == leaked
    assert note == ("task 't': 1 group of images both train and are scored in the val split, which is kept as "
                    "given; its 1 val image of them is set aside in each row's clean score")


def test_a_row_reports_its_score_without_the_images_set_aside(tmp_path):
    protocol = _task("classification", split=True).decide(5, 0)
    scored = protocol.scored
    y_pred = protocol.y[scored].copy()
    y_pred[:3] = _wrong(y_pred[:3])
    row = score_row(protocol, y_pred, head="h", backbone="b", weights="w", tap="pooled")
    assert "accuracy_clean" not in row.metrics and row.clean_score is None  # nothing checked
    protocol.set_aside(scored[[0, 1, 5]])  # two of the wrong ones, one right
    protocol.set_aside(np.isin(protocol.ids, protocol.ids[scored[[5, 6]]]))  # a mask, one more
    row = score_row(protocol, y_pred, head="h", backbone="b", weights="w", tap="pooled")
    assert row.metrics["accuracy"] == pytest.approx(7 / 10)
    assert row.metrics["n_set_aside"] == 4 and row.metrics["accuracy_clean"] == pytest.approx(5 / 6)
    assert list(get_kind("classification").columns[5:7]) == ["accuracy_clean", "n_set_aside"]
    saved = Protocol.load(protocol.save(tmp_path / "p.json"))
    assert np.array_equal(saved.aside, protocol.aside) and saved.id == protocol.id
    kept = saved.restricted(np.arange(N) != scored[0])
    assert int(kept.aside.sum()) == 3


def test_the_leaderboard_says_whether_its_ranking_holds_without_them(tmp_path):
    """Row A beats B on all val images only thanks to the set-aside ones: ranked first, second clean."""
    run = RunFolder(tmp_path / "run")
    protocol = _task("classification", split=True).decide(5, 0)
    scored = protocol.scored
    protocol.set_aside(scored[:3])
    run.save_protocol(protocol)
    truth = protocol.y[scored]
    a, b, c = truth.copy(), truth.copy(), truth.copy()
    a[3:5] = _wrong(a[3:5])  # A: 8/10, clean 5/7
    b[:3] = _wrong(b[:3])  # B: 7/10, clean 7/7
    c[:4] = _wrong(c[:4])  # C: 6/10, clean 6/7
    rows = [run.score(protocol, p, head=h, backbone="b", weights="w", tap="pooled", head_file=f"heads/{h}.skops")
            for h, p in (("A", a), ("B", b), ("C", c))]
    ranked = run.add_rows(rows)
    assert [(r.head, r.rank_clean) for r in ranked] == [("A", 3), ("B", 1), ("C", 2)]
    assert clean_ranking(ranked) == {"t": "task 't' without its 3 set-aside images: best row unchanged: no; "
                                          "Kendall tau -0.33 over 3 rows"}
    header = (run.path / "leaderboard.csv").read_text().splitlines()[0].split(",")
    assert {"accuracy_clean", "n_set_aside", "rank_clean"} <= set(header)
    assert [r.rank_clean for r in RunFolder(run.path).rows()] == [3, 1, 2]


def test_a_label_files_group_column_reaches_the_protocol(tiny_run, tmp_path):
    """``id,label,split,group``: fit keeps each group in one fold, a refit with other groups is refused."""
    ids = load_task(tiny_run["cache"]).ids
    label_file = tmp_path / "objects.csv"

    def write(group_size: int) -> None:
        label_file.write_text("id,label,split,group\n" + "".join(
            f"{sid},{sid.split('/')[1]},,{sid.split('/')[1]}{k // group_size}\n" for k, sid in enumerate(ids)))

    write(3)
    task = read_labels(label_file)
    assert list(task.groups[:4]) == ["blue0", "blue0", "blue0", "blue1"]
    fit(tiny_run["cache"], tmp_path / "run", labels=[label_file], heads=["knn"], cv=3, n_jobs=1, progress=False)
    protocol = RunFolder(tmp_path / "run").protocol("objects")
    assert protocol.eval == "cv3" and protocol.groups is not None
    fold = dict(zip(protocol.ids, protocol.folds))
    for g in set(task.groups):
        assert len({fold[i] for i in task.ids[task.groups == g]}) == 1, g
    write(2)
    with pytest.raises(PipelineError, match="groups 12 -> 18"):
        fit(tiny_run["cache"], tmp_path / "run", labels=[label_file], heads=["knn"], cv=3, n_jobs=1, progress=False)


def test_an_audits_out_of_fold_plan_keeps_groups_together():
    """The folds over a held-out protocol's training images (an audit's out-of-fold probabilities) keep
    each group in one fold too."""
    names = np.array([f"obj{i // 4}" if i < 20 else "" for i in range(N)], dtype=object)
    protocol = _task("classification", split=True, groups=names).decide(5, 0)
    plan = protocol.oof_plan(cv=3, seed=0)[1:]
    assert len(plan) == 3
    for _, predicted in plan:
        inside = set(protocol.groups[predicted])
        for _, other in plan:
            if other is not predicted:
                assert not (inside - {-1}) & set(protocol.groups[other])


def test_fit_keeps_confirmed_copies_in_one_fold(tmp_path, monkeypatch):
    """A task without a split: fit's copy check runs before the folds are decided, and each confirmed
    copy lands in its original's fold (the check's answer planted here: the tiny model's features and
    generated images have no real copies)."""
    from conftest import TINY, make_folder
    from pipeline import extract
    from pipeline.copies import Copies
    from pipeline.stages import fit as fit_module

    data = make_folder(tmp_path / "flat", n_train=10, n_val=0, splits=False)
    [res] = extract(data, TINY, tmp_path / "cache", workers=0, progress=False)
    pairs = [(0, 7), (3, 12), (12, 15)]  # 3, 12 and 15: a copy of a copy

    def planted(X, ids, images, **_):
        i, j = (np.array(p) for p in zip(*pairs))
        one = np.ones(len(pairs))
        return Copies(i, j, one, one, one.astype(bool), 0.5, 0.99, True)

    monkeypatch.setattr(fit_module, "find_copies", planted)
    run = fit(res.cache, tmp_path / "run", heads=["centroid"], cv=5, n_jobs=1, progress=False)
    protocol = RunFolder(run.out).protocol(run.rows[0].task)
    folds = protocol.folds
    assert protocol.cross_validated and folds[0] == folds[7] and folds[3] == folds[12] == folds[15]
    assert protocol.groups is not None and len(set(folds)) == 5
