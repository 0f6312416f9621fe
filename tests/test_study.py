"""A whole study from one file: every stage it needs, nothing the caches and run folder already hold."""

import pytest

from conftest import TINY, TINY_VIT, run_cli
from pipeline import PipelineError, RunFolder, run


@pytest.fixture
def study(tmp_path, folder):
    (tmp_path / "coin.csv").write_text("id,label\n" + "".join(
        f"{p.relative_to(folder)},{'h' if k % 2 else 't'}\n" for k, p in enumerate(sorted(folder.rglob("*.jpg")))))
    path = tmp_path / "study.toml"
    path.write_text(f"""
data = "{folder.name}"
backbones = ["{TINY}", "{TINY_VIT}"]
out = "runs/s"
labels = ["coin.csv"]
heads = ["knn", "logreg"]
[extract]
workers = 0
[fit]
n_jobs = 1
concat = true
[[finetune]]
out = "ft"
backbone = "{TINY}"
epochs = 1
batch_size = 8
workers = 0
""")
    return path


def test_a_study_runs_what_it_needs_and_then_nothing(study, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # paths are the study file's, whatever the working directory
    first = run(study, progress=False)
    assert [(s.stage, s.needed) for s in first] == [("extract", True), ("extract", True), ("fit", True), ("finetune", True)]
    rows = RunFolder(tmp_path / "runs" / "s").rows()
    assert len(rows) == 3 * 2 * 2 + 1 and sum(r.stage == "finetune" for r in rows) == 1
    again = run(study, progress=False)
    assert not any(s.needed for s in again), [s.line() for s in again]
    # an edit costs only what it changes: another head refits, nothing is extracted or fine-tuned again
    study.write_text(study.read_text().replace('heads = ["knn", "logreg"]', 'heads = ["knn", "logreg", "centroid"]'))
    plan = run(study, dry_run=True)
    assert [(s.stage, s.needed) for s in plan] == [("extract", False), ("extract", False), ("fit", True), ("finetune", False)]
    assert "heads differ" in plan[2].reason
    from pipeline.stages import fit as fit_module

    real, fitted = fit_module._fit_one, []
    monkeypatch.setattr(fit_module, "_fit_one", lambda head, *a: fitted.append(head) or real(head, *a))
    run(study, progress=False)
    rows = RunFolder(tmp_path / "runs" / "s").rows()
    assert len(rows) == 3 * 2 * 3 + 1  # the fine-tune's row kept
    assert fitted == ["centroid"] * 6  # only the new head's rows were fitted (3 backbones x 2 tasks)
    # a label file edited in place is a reason to fit again
    labels = tmp_path / "coin.csv"
    labels.write_text(labels.read_text().replace(",h\n", ",t\n", 1))
    plan = run(study, dry_run=True)
    assert plan[2].needed and "a label file changed" in plan[2].reason, plan[2].line()


@pytest.mark.slow
def test_cli_dry_run_prints_the_plan(study):
    r = run_cli("run", study, "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("extract   run   test_efficientnet.r160_in1k -> ") and "36 of 36 images to compute" in lines[0]
    assert lines[2].startswith("fit       run ") and lines[-1] == "would run 4 of 4 steps"
    assert not (study.parent / "runs").exists()


@pytest.mark.parametrize("text, message", [
    ('backbones = ["x"]\nout = "r"\n', "missing data"),
    ('data = "d"\nbackbones = ["x"]\nout = "r"\nhead = ["knn"]\n', "unknown key\\(s\\) head"),
    ('data = "d"\nbackbones = ["x"]\nout = "r"\n[fit]\nfolds = 3\n', "\\[fit\\] folds is no setting \\(known: .*cv, "),
    ('data = "d"\nbackbones = ["x"]\nout = "r"\n[extract]\ndecoder = "pil"\n',
     "\\[extract\\] decoder is no setting \\(known: .*decode, "),
    ('data = "d"\nbackbones = ["x"]\nout = "r"\n[[finetune]]\nepochs = 1\n', "#1 has no out"),
    ('data = "d"\nbackbones = [\n', "not valid TOML"),
])
def test_bad_study_files_are_named(tmp_path, text, message):
    (tmp_path / "s.toml").write_text(text)
    with pytest.raises(PipelineError, match=message):
        run(tmp_path / "s.toml", dry_run=True)


def _no_model(*args, **kwargs):
    raise AssertionError("a dry run loaded a model")


def test_a_dry_run_names_the_caches_without_building_a_model(study, tmp_path, folder, monkeypatch):
    """The plan is the model source's (weights file hash, pretrained config): the caches it names are
    the ones extract writes, and it sees them complete, all without a model."""
    from pipeline import extract

    with monkeypatch.context() as m:
        m.setattr("pipeline.featurizer.load_backbone", _no_model)
        plan = run(study, dry_run=True)
    assert [(s.stage, s.needed) for s in plan[:2]] == [("extract", True), ("extract", True)]
    written = extract(folder, [TINY, TINY_VIT], tmp_path / "cache", workers=0, progress=False)
    assert [s.what for s in plan[:2]] == [f"{r.backbone} -> {r.cache.name}" for r in written]
    with monkeypatch.context() as m:
        m.setattr("pipeline.featurizer.load_backbone", _no_model)
        again = run(study, dry_run=True)
    assert [(s.needed, s.reason) for s in again[:2]] == [(False, "the cache holds all 36 images")] * 2


def test_a_dry_run_says_what_only_the_model_could_tell(tmp_path, folder, monkeypatch):
    """A user's module is built to be hashed, and layer-1 counts from a last layer only the model knows:
    the dry run says so instead of building it."""
    (tmp_path / "s.toml").write_text(f'data = "{folder.name}"\nbackbones = ["user_nets:tiny_net", "{TINY}"]\n'
                                     'out = "r"\n[extract]\ntaps = ["pooled", "layer-1"]\n')
    monkeypatch.setattr("pipeline.featurizer.load_backbone", _no_model)
    module, tiny, fit = run(tmp_path / "s.toml", dry_run=True)
    assert module.line() == ("extract   run   user_nets:tiny_net -> cache name unknown until extraction: the "
                             "cache's name is known once the model is loaded, and a dry run loads none")
    assert tiny.needed and tiny.what.startswith(f"{TINY} -> shapes__") and "which layers its taps are" in tiny.reason
    assert fit.needed
