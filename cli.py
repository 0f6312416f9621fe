"""`pipeline`: the command line over the library. Parses arguments, calls one function, prints.

Exit codes: 0 success (also when some images failed and were recorded), 1 a fatal problem with the
input (one-line message on stderr), 2 a usage error (bad flag or value), 130 interrupted.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

try:
    from typer._click.exceptions import UsageError  # the click that typer vendors (0.29) and parses with
except ImportError:
    from click.exceptions import UsageError

from pipeline.errors import PipelineError
from pipeline.progress import progress_mode, tell
from pipeline.spec import SPEC_INPUTS


class _Commands(TyperGroup):
    """Says why a command stopped on Ctrl-C or SIGTERM (the stage's :class:`~pipeline.errors.Interrupted`
    line: what it kept, the command that goes on) before exit status 130, which typer would give silently;
    under ``--log-json``, a usage error too is one JSON line (exit status 2)."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            tell("interrupted", str(e) or "stopped before it had finished anything to keep; the same command starts again")
            raise typer.Exit(130) from None
        except UsageError as e:
            if progress_mode() != "json":
                raise
            tell("error", e.format_message(), usage=e.ctx.command_path if e.ctx else "pipeline")
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
    help="Extract frozen-backbone features once into an HDF5 cache, compare cheap heads on it, "
    "fine-tune where it pays, predict on new images.",
)
cache_app = typer.Typer(no_args_is_help=True, help="Inspect feature caches.")
app.add_typer(cache_app, name="cache")


@app.callback()
def _reporting(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress lines or bars (errors and results still print)")] = False,
    log_json: Annotated[bool, typer.Option("--log-json", help="progress and events as one JSON object per line on stderr, for machines")] = False,
) -> None:
    """How every command reports progress: bars on a terminal, a line every few seconds in a log."""
    from pipeline.progress import set_progress_mode

    set_progress_mode("quiet" if quiet else "json" if log_json else "auto")


def _split_list(values: list[str] | None) -> list[str]:
    """Accept both `--x a,b` and `--x a --x b`; an empty name beside a comma is a typo, refused."""
    names = []
    for value in values or []:
        parts = [v.strip() for v in value.split(",")] if value.strip() else []
        if "" in parts:
            raise PipelineError(f"an empty name in {value!r}: names are separated by single commas, such as ridge,knn")
        names += parts
    return names


def _device_option():
    return typer.Option("--device", help="auto (CUDA if present), cpu or cuda")


def _one_of(name: str) -> str:
    """The values the feature spec's table allows for the input ``name``, for its help."""
    return ", ".join(map(str, SPEC_INPUTS[name].allowed()))


@app.command()
def extract(
    data: Annotated[Path, typer.Argument(help="an image folder laid out [split/]class/image; a CSV manifest (path[,label,split,id]); WebDataset .tar shards (a folder of them or a brace pattern data-{000..009}.tar); or a .parquet file (or folder) of image bytes")],
    backbone: Annotated[list[str], typer.Option("--backbone", "-b", help="timm model name; repeat for several backbones")],
    cache: Annotated[Path, typer.Option("--cache", help="directory for the cache files (one per backbone)")] = Path("cache"),
    weights: Annotated[Optional[Path], typer.Option("--weights", help="weights file (.safetensors) for a single --backbone; else $PIPELINE_WEIGHTS_DIR/<name>.safetensors, else timm's hub")] = None,
    taps: Annotated[Optional[list[str]], typer.Option("--taps", help="features to keep, comma-separated: pooled (pre-logits embedding), logits, layer<i> (intermediate i of timm's forward_intermediates, average-pooled or a ViT's class token; layer-1 is the last)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    workers: Annotated[Optional[int], typer.Option("--workers", help="decode worker processes (default: min(4, cores)); a decoder that crashes or hangs one costs only its image; 0 decodes in this process, without that protection")] = None,
    decode_timeout: Annotated[float, typer.Option("--decode-timeout", help="seconds a worker may take over a batch; an image that takes longer alone is a recorded failure")] = 60.0,
    device: Annotated[str, _device_option()] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help=f"storage dtype: {_one_of('dtype')}")] = SPEC_INPUTS["dtype"].default,
    amp: Annotated[str, typer.Option("--amp", help=f"autocast dtype of the forward pass: {_one_of('amp')}; auto is bf16 on GPUs that have it, else fp16; on CPUs bf16 only where native")] = SPEC_INPUTS["amp"].default,
    channels_last: Annotated[bool, typer.Option("--channels-last/--no-channels-last", help="NHWC memory format (faster convolutions on CPU and GPU)")] = True,
    tta: Annotated[Optional[str], typer.Option("--tta", help="test-time augmentation: flip stores the mean of an image's and its mirror's features")] = SPEC_INPUTS["tta"].default,
    jpeg_draft: Annotated[bool, typer.Option("--jpeg-draft/--no-jpeg-draft", help="decode large JPEGs at reduced scale (DCT) down to the size the resize needs")] = SPEC_INPUTS["jpeg_draft"].default,
    decode: Annotated[Optional[str], typer.Option("--decode", help="decode path (part of the cache's key), a decoder registered in pipeline.preprocess: turbo (libjpeg-turbo, only the kept region resized, on uint8: about 2x cheaper), pil (Pillow + timm's own transform), nvjpeg (JPEGs decoded on the CUDA GPU). Default: turbo, except where the --cache folder holds this source's pil cache of the backbone and no turbo one: that cache goes on with pil")] = SPEC_INPUTS["decode"].default,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile normalisation + forward for a fixed batch shape (pays off on long runs)")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="retry images that failed before even if their bytes did not change")] = False,
    allow_outside_root: Annotated[bool, typer.Option("--allow-outside-root", help="let a CSV manifest name files outside its folder (absolute paths, ..)")] = False,
    name: Annotated[Optional[str], typer.Option("--name", help="the source's name in its cache files (default: the folder's or file's name), so two sources of one name can share a --cache")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Run frozen backbones over every image once and cache the features in HDF5.

    On many GPUs or nodes, launch it with torchrun (`torchrun --nproc-per-node N -m pipeline extract ...`):
    each rank extracts its share into a shard file and rank 0 writes the cache over the shards.
    """
    from pipeline.stages.extract import extract as run

    results = run(data, backbone, cache, weights=weights, taps=_split_list(taps) or ["pooled"], batch_size=batch_size,
                  workers=workers, device=device, dtype=dtype, amp=amp, channels_last=channels_last, tta=tta,
                  jpeg_draft=jpeg_draft, decode=decode, compile=compile, retry_failed=retry_failed,
                  allow_outside_root=allow_outside_root, progress=progress, decode_timeout=decode_timeout, name=name)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports for all
    for r in results:
        speed = f"{r.images_per_s:.1f} images/s" if r.extracted else "nothing to compute"
        typer.echo(
            f"{r.backbone}: extracted {r.extracted}, reused from cache {r.reused}, failed {r.failed} "
            f"(new {r.new}, changed {r.changed}{f', copied from caches of other sources {r.copied}' if r.copied else ''}); "
            f"{speed}; cache {r.cache}"
        )
        if r.failed:
            tell("note", f"{r.failed} image{'s' if r.failed != 1 else ''} of the source could not be read or decoded; "
                         f"`pipeline cache info {r.cache}` names them and why, and --retry-failed tries them again")
        if r.gone:
            tell("note", f"{r.cache.name} keeps the features of {r.gone} image{'s' if r.gone != 1 else ''} the source no longer lists (deleted "
                         "or renamed) for predict to reuse; fit, audit and neighbors leave them out")
        if r.note:
            tell("note", r.note)


@app.command()
def fit(
    caches: Annotated[list[Path], typer.Argument(help="cache files, or directories meaning every *.h5 in them")],
    out: Annotated[Path, typer.Option("--out", help="run directory for the leaderboard, heads and plots")],
    labels: Annotated[Optional[list[Path]], typer.Option("--labels", help="extra task: CSV id,label[,split] (classification), id,labels[,split] (tags separated by |) or id,target[,split] (a number); or a folder of them (one task per *.csv); repeatable")] = None,
    heads: Annotated[Optional[list[str]], typer.Option("--heads", help="comma-separated head names (see `pipeline heads`), or module:Class for any scikit-learn classifier (regressor for a regression task); default: each task kind's own (classification: logreg,mlp,knn; multilabel: logreg,ridge,knn; regression: ridge,knn,mlp)")] = None,
    head_param: Annotated[Optional[list[str]], typer.Option("--head-param", help="key=value for the module:Class heads (Python literal values); repeatable")] = None,
    taps: Annotated[Optional[list[str]], typer.Option("--taps", help="taps to fit on (default: every tap in the cache)")] = None,
    cv: Annotated[int, typer.Option("--cv", help="folds of stratified CV when a task has no train/val split")] = 5,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    n_jobs: Annotated[int, typer.Option("--n-jobs", help="parallel fits (joblib; -1 = all cores)")] = -1,
    chunk_rows: Annotated[int, typer.Option("--chunk-rows", help="rows read at a time by heads that train by chunks (`pipeline heads` says which); the others load a task's features whole")] = 65536,
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="bound on the features the heads hold, e.g. 8GB or 512MB (powers of 1024) or a number of bytes, shared by the jobs that run at once: over it, heads that train by chunks (`pipeline heads` says which) read smaller chunks and the others are refused (their row says why)")] = None,
    portable: Annotated[bool, typer.Option("--portable", help="knn heads carry their training features (default: they keep the images' ids, and predict reads the features from the cache, so the head file stays small)")] = False,
    concat: Annotated[bool, typer.Option("--concat", help="also fit on the concatenation of all the caches' features, as one more backbone")] = False,
    shots: Annotated[Optional[list[str]], typer.Option("--shots", help="few-shot curves: examples per class, comma-separated, e.g. 1,2,5,10,all")] = None,
    draws: Annotated[int, typer.Option("--draws", help="seeded draws of the examples per --shots value (mean ± std over them)")] = 5,
    backend: Annotated[str, typer.Option("--backend", help="where the fits run: loky (processes), threading, dask or ray (extras, in the repository: pip install -e '.\\[dask]' / '.\\[ray]')")] = "loky",
    cluster: Annotated[Optional[str], typer.Option("--cluster", help="address of an existing Dask scheduler (tcp://host:8786) or Ray cluster; default: a local one")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a run whose tasks were evaluated on other images, folds or seed (default: rows are merged into the run by key, and such a run is refused)")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Fit and compare heads on cached features; write a leaderboard, the heads, plots and report.html.

    Into a run folder that already has rows, the new rows replace those of the same backbone, weights,
    tap, task and head, and the others (a fine-tune's) stay; every task is ranked and tested again."""
    from pipeline.stages.fit import fit as run
    from pipeline.heads import parse_head_params
    from pipeline.report import fewshot_table

    result = run(caches, out, labels=labels or [], heads=None if heads is None else _split_list(heads),
                 taps=_split_list(taps) or None, cv=cv, seed=seed, n_jobs=n_jobs, chunk_rows=chunk_rows, max_memory=max_memory,
                 head_params=parse_head_params(head_param or []), concat=concat, shots=_split_list(shots),
                 draws=draws, backend=backend, cluster=cluster, overwrite=overwrite, portable=portable, progress=progress)
    typer.echo(result.markdown())
    for task in dict.fromkeys(r["task"] for r in result.fewshot):
        columns, table = fewshot_table(result.fewshot, task)
        width = max(len(name) for name, _ in table)
        typer.echo(f"\nfew-shot accuracy on {task} (mean ± std over draws), by examples per class:")
        typer.echo(f"{'head / backbone':{width}s}  " + "  ".join(f"{k:>13s}" for k in columns))
        for name, values in table:
            typer.echo(f"{name:{width}s}  " + "  ".join(f"{v:>13s}" for v in values))
    for row in result.fewshot:
        if row["error"]:
            tell("note", f"few-shot {row['head']} / {row['backbone']} on {row['task']} at {row['shots']}: {row['error']}")
    for row in result.rows:
        if not row.scored:
            tell("warning", f"{row.head} on {row.task}/{row.tap} failed: {row.error}")
    for note in result.notes:
        tell("note", note)
    for task, message in result.near_copies.items():
        tell("", f"{task}: {message}; see pipeline audit", task=task)
    typer.echo(f"\n{result.time_summary()}")
    typer.echo(f"leaderboard: {result.files['csv']}  heads: {result.out / 'heads'}")
    for name, path in result.files.items():
        if name.startswith("confusion_"):
            typer.echo(f"confusion matrix (best row of {name[len('confusion_'):]}): {path}")
        elif name.startswith("fewshot_") and path.suffix == ".png":
            typer.echo(f"few-shot plot ({name[len('fewshot_'):]}): {path}")
    typer.echo(f"report: {result.files['report']}")
    if not any(row.scored for row in result.rows):
        tell("error", "no row could be fitted (see the warnings above)")
        sys.exit(1)


@app.command()
def finetune(
    data: Annotated[Path, typer.Argument(help="image folder or CSV manifest with labels (and train/val splits)")],
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="timm model name")],
    out: Annotated[Path, typer.Option("--out", help="folder for model.safetensors + config.json (the kept epoch), metrics.json, last.pt (resume state); OUT/fold<k> per fold of a cross-validated task")],
    init: Annotated[Optional[Path], typer.Option("--init", help="a fit run folder: start the classifier from its best linear head, and score on its protocol")] = None,
    run: Annotated[Optional[Path], typer.Option("--run", help="fit run folder whose protocol scores the fine-tune and whose leaderboard gets the row finetune:<strategy> (default: --init)")] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="train on this label file's task (id,label[,split]) instead of the data's own labels")] = None,
    strategy: Annotated[Optional[str], typer.Option("--strategy", help="lp-ft (default with --init): probe head, head epochs, then top blocks; freeze-unfreeze (default without): the same from a fresh head; discriminative: then every block, lr decaying towards the stem")] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="all epochs, head-only ones included")] = 5,
    head_epochs: Annotated[int, typer.Option("--head-epochs", help="first epochs that train the classifier alone")] = 1,
    unfreeze: Annotated[str, typer.Option("--unfreeze", help="lp-ft/freeze-unfreeze: top K block groups (timm's group_matcher) to train after the head epochs, or 'all'")] = "2",
    lr: Annotated[Optional[float], typer.Option("--lr", help="classifier learning rate, AdamW (default: 1e-4 with --init, else 1e-3)")] = None,
    backbone_lr_scale: Annotated[float, typer.Option("--backbone-lr-scale", help="lp-ft/freeze-unfreeze: unfrozen blocks train at lr times this")] = 0.1,
    layer_decay: Annotated[float, typer.Option("--layer-decay", help="discriminative: each block one step further from the top trains at this times the lr of the one above")] = 0.75,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.05,
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", help="linear warmup at the start of each phase (head, blocks), then cosine decay")] = 0.5,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing")] = 0.0,
    aug: Annotated[str, typer.Option("--aug", help="training augmentation: light (crop 50-100 %, flip), standard (timm's defaults: crop 8-100 %, flip, colour jitter), none")] = "light",
    bn: Annotated[str, typer.Option("--bn", help="freeze (default): keep BatchNorm's pretrained running statistics; a few hundred images at batch 32 give noisier ones. train: update them (large data)")] = "freeze",
    amp: Annotated[str, typer.Option("--amp", help=f"autocast: {_one_of('amp')}; auto is bf16 on GPUs that have it, else fp16 with loss scaling; on CPUs bf16 only where native")] = SPEC_INPUTS["amp"].default,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    accum_steps: Annotated[int, typer.Option("--accum-steps", help="gradient accumulation: an optimizer step every N batches")] = 1,
    patience: Annotated[Optional[int], typer.Option("--patience", help="stop after N epochs without a better selection accuracy (default 3; 0 never stops early)")] = 3,
    select_fraction: Annotated[float, typer.Option("--select-fraction", help="share of the training images held out of training to choose the epoch (seeded, stratified); 0: keep the last epoch")] = 0.2,
    cv: Annotated[int, typer.Option("--cv", help="folds for a task without a train/val split that the run does not already hold")] = 5,
    budget_minutes: Annotated[Optional[float], typer.Option("--budget-minutes", help="stop cleanly before this much wall time, keeping the best epoch (continue with --resume)")] = None,
    checkpoint_minutes: Annotated[float, typer.Option("--checkpoint-minutes", help="save last.pt within an epoch this often (and after every epoch)")] = 1.0,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out from its last.pt after a kill or a budget stop")] = False,
    keep_checkpoints: Annotated[bool, typer.Option("--keep-checkpoints", help="keep every last.pt and each fold's model once training has ended (default: only the final model, metrics and predictions stay)")] = False,
    workers: Annotated[Optional[int], typer.Option("--workers")] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="starting weights file (.safetensors)")] = None,
    device: Annotated[str, _device_option()] = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Fine-tune a backbone on labelled images, scored on the run's protocol like its heads: it never
    trains on (or chooses its epoch by) the images it is scored on; a cross-validated task is fine-tuned
    once per fold."""
    from pipeline.stages.finetune import finetune as run_finetune
    from pipeline.kinds import get_kind

    result = run_finetune(
        data, backbone, out, init, run=run, labels=labels, resume=resume, budget_minutes=budget_minutes,
        checkpoint_minutes=checkpoint_minutes, workers=workers, weights=weights, device=device, progress=progress,
        log=typer.echo, keep_checkpoints=keep_checkpoints, strategy=strategy, epochs=epochs, head_epochs=head_epochs, unfreeze=unfreeze, lr=lr,
        backbone_lr_scale=backbone_lr_scale, layer_decay=layer_decay, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, aug=aug, bn=bn, amp=amp, batch_size=batch_size,
        accum_steps=accum_steps, patience=patience or None, select_fraction=select_fraction, cv=cv, seed=seed,
    )
    for fold in result.folds:
        name = fold["fold"] or "model"
        if len(result.folds) > 1:
            typer.echo(f"{name}: {fold['n_train']} training images, {fold['n_scored']} scored")
        for h in fold["history"]:
            loss = f"{h['train_loss']:.4f}" if h["train_loss"] is not None else "-"
            partial = " (partial epoch)" if h["partial"] else ""
            chosen = (f"selection {h['metric']} {h['score']:.4f} on {h['n_select']} held-out training images"
                      if h["score"] is not None else "no selection")
            typer.echo(f"epoch {h['epoch']} ({h['phase']}){partial}: train loss {loss}, {chosen}, "
                       f"{h['train_seconds']:.1f} s training so far")
        stop = {"finished": "", "early-stopping": " (stopped early: no better epoch in --patience epochs)",
                "budget": f" (stopped by --budget-minutes; continue with --resume --out {out})"}[fold["stopped"]]
        typer.echo(f"kept epoch {fold['best_epoch']}{stop}")
    if result.row is not None:
        r = result.row
        kind = get_kind(r.task_kind)
        metric, (low, high) = kind.primary, (r.metrics.get(k) for k in kind.interval)
        typer.echo(f"scored on {result.eval_split}: {metric} {r.metrics[metric]:.4f} [{low:.4f}, {high:.4f}] "
                   f"on {r.n_test} images (chance {r.metrics['chance']:.4f})")
    typer.echo(f"model: {result.out / 'model.safetensors'}  metrics: {result.out / 'metrics.json'}")
    if result.row is not None and (run or init) is not None:
        typer.echo(f"leaderboard row {result.row.head} added to {run or init}"
                   + ("" if result.row.comparable else " (scored on fewer images: shown apart, not ranked)"))


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="a fit run folder (its best row), a .skops head, or a fine-tuned model folder")],
    images: Annotated[list[Path], typer.Argument(help="image files or folders")],
    out: Annotated[Optional[Path], typer.Option("--out", help="CSV to write (default: print CSV to stdout)")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="with a run folder: whose best row to use (default: the first task)")] = None,
    weights: Annotated[Optional[list[Path]], typer.Option("--weights", help="weights file(s) to use when the model's are no longer where they were recorded (matched by sha256); repeatable")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    workers: Annotated[Optional[int], typer.Option("--workers")] = None,
    device: Annotated[str, _device_option()] = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    coverage: Annotated[Optional[float], typer.Option("--coverage", help="with a run folder: add each image's prediction_set (numbers: prediction_low, prediction_high) holding the true label this often, e.g. 0.9, calibrated on the run's out-of-sample predictions")] = None,
    ood_percentile: Annotated[float, typer.Option("--ood-percentile", help="flag an image ood when its distance to the nearest training image is above this percentile of the training images' own")] = 99.0,
    row: Annotated[Optional[int], typer.Option("--row", help="with a run folder: predict with this leaderboard row, counted from 1 as in leaderboard.md, instead of the best")] = None,
) -> None:
    """Predict labels and class probabilities for new images, one row per image, through the feature spec
    the model was trained on (images in its cache are read from there); with a run folder, also how
    unlike the training data each image is (ood_score, ood) and, with --coverage, prediction sets."""
    from pipeline.stages.predict import predict as run

    rows = run(model, images, out=out, task=task, weights=weights or [], batch_size=batch_size, workers=workers,
               device=device, progress=progress, coverage=coverage, ood_percentile=ood_percentile, row=row)
    failed = sum(1 for r in rows if r["error"])
    if out is None:
        writer = csv.DictWriter(sys.stdout, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    else:
        typer.echo(f"predicted {len(rows) - failed} image(s), {failed} failed; wrote {out}")
    for line in rows.summary:
        typer.echo(line, err=out is None)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a fit run folder")],
    row: Annotated[Optional[int], typer.Option("--row", help="leaderboard row, counted from 1 as in leaderboard.md")] = None,
) -> None:
    """Write RUN_DIR/report.html again, or, with --row N, print one row scored part by part: per class
    (precision, recall, F1, and the confusion matrix), per tag (average precision, and precision, recall
    and F1 at 0.5) or per quarter of the scored images ordered by true target (MAE, RMSE, mean error); its
    plot joins the report."""
    from pipeline.evaluation import RunFolder
    from pipeline.kinds import get_kind
    from pipeline.report import publish, row_report, table_lines

    run = RunFolder(run_dir)
    if not run.exists:
        raise PipelineError(f"{run_dir} is not a fit run folder (no leaderboard.json)")
    if row is None:
        typer.echo(f"report: {publish(run)['report']}")
        return
    rep = row_report(run_dir, row)
    r, found, kind = rep["row"], rep["breakdown"], get_kind(rep["row"].task_kind)
    low, high = (r.metrics[c] for c in kind.interval)
    typer.echo(f"row {row}: {r.backbone} / {r.tap} / {r.task} / {r.head} on {r.eval}: "
               f"{kind.primary} {r.score:.4f} [{low:.4f}, {high:.4f}]")
    for line in table_lines(found.columns, found.lines):
        typer.echo(line)
    if found.confusion is not None:
        width = max(len(c) for c in found.labels + [found.columns[0]])
        typer.echo("confusion (rows: true, columns: predicted, in the order above):")
        for c, counts in zip(found.labels, found.confusion):
            typer.echo(f"{c:{width}s}  " + " ".join(f"{n:5d}" for n in counts))
    if rep["png"] is not None:
        typer.echo(f"plot: {rep['png']}")
    typer.echo(f"report: {publish(run)['report']}")


@app.command("run")
def run_study(
    study: Annotated[Path, typer.Argument(help="a study file (TOML): data, backbones, taps, label files, heads, shots, fine-tunes, output folders")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan (each stage: run or skip, and why) and do nothing")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Run every stage of a study that its caches and run folder do not already hold."""
    from pipeline.stages.study import Study, run

    steps = run(study, dry_run=dry_run, progress=progress, log=typer.echo)
    done = sum(s.needed for s in steps)
    typer.echo(f"{'would run' if dry_run else 'ran'} {done} of {len(steps)} steps")
    if not dry_run:
        _best_rows(Study.read(study).out)


def _best_rows(out: Path) -> None:
    """Each task's best row of the run ``out`` and where its report is."""
    from pipeline import RunFolder, best_row
    from pipeline.kinds import get_kind

    run = RunFolder(out)
    rows = run.rows()
    for task in dict.fromkeys(r.task for r in rows):
        best = best_row(rows, task)
        if best is not None:
            typer.echo(f"best on {task}: {best.backbone} / {best.tap} / {best.head}, {get_kind(best.task_kind).primary} "
                       f"{best.score:.4f} on {best.eval}")
    typer.echo(f"report: {run.artifact('report')}")


@app.command()
def audit(
    caches: Annotated[list[Path], typer.Argument(help="cache files or directories (every *.h5); several caches are several backbones over the same images, used side by side")],
    out: Annotated[Path, typer.Option("--out", help="folder for label_issues_<task>.csv, duplicates.csv, outliers.csv, map.csv/.png and audit.html")],
    labels: Annotated[Optional[list[Path]], typer.Option("--labels", help="extra task: CSV id,label[,split] (classification), id,labels[,split] (tags separated by |) or id,target[,split] (a number); or a folder of them (one task per *.csv); repeatable")] = None,
    run: Annotated[Optional[Path], typer.Option("--run", help="fit run folder: score label issues under its stored protocols, and link the audit from its report.html")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="the image folder or manifest the cache was made from, for thumbnails on the page")] = None,
    tap: Annotated[str, typer.Option("--tap", help="features to audit")] = "pooled",
    head: Annotated[str, typer.Option("--head", help="head whose out-of-fold predictions rank the labels: auto (a plain logistic regression on unit-length features for classes, logreg for tags, ridge for numbers), run (the --run's best row that can), or a head name (for the tasks it can score; the others get auto's)")] = "auto",
    cv: Annotated[int, typer.Option("--cv", help="folds for a task without a split, and over the training images of one with a split")] = 5,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    dup_threshold: Annotated[Optional[float], typer.Option("--dup-threshold", help="cosine similarity from which two images are copies when their pixels cannot be read (default: the cache's own upper fence, see docs/audit.md)")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="nearest neighbours the outlier score averages over")] = 10,
    map_method: Annotated[str, typer.Option("--map", help="2-D map: auto (UMAP when umap-learn is installed, else t-SNE), umap, tsne, none")] = "auto",
    top: Annotated[int, typer.Option("--top", help="examples of each finding shown on the page")] = 24,
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="bound on the features and their copies the audit holds, e.g. 8GB (powers of 1024) or a number of bytes: under it the audit holds every image's features, over it it reads them from the cache by chunks")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an earlier audit in --out (refused otherwise); its files are removed only when the new audit's are written")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="say each step as it ends")] = True,
) -> None:
    """Ask the cache about the data: probable label errors (cleanlab on out-of-fold probabilities),
    near-duplicates across splits, outliers, a map; one page to look at, audit.html."""
    from pipeline.stages.audit import audit as run_audit
    from pipeline.evaluation import RunFolder

    result = run_audit(caches, out, labels or [], run=run, data=data, tap=tap, head=head, cv=cv, seed=seed,
                       dup_threshold=dup_threshold, k=k, map=map_method, top=top, max_memory=max_memory,
                       overwrite=overwrite, progress=progress)
    for line in result.lines():
        typer.echo(line)
    if run is not None:
        typer.echo(f"linked from {RunFolder(run).artifact('report')}")


@app.command()
def neighbors(
    cache: Annotated[Path, typer.Argument(help="a cache file (.h5), or a folder holding one")],
    images: Annotated[list[Path], typer.Argument(help="image files or folders")],
    k: Annotated[int, typer.Option("-k", "--k", help="neighbours per image")] = 8,
    tap: Annotated[str, typer.Option("--tap")] = "pooled",
    out: Annotated[Optional[Path], typer.Option("--out", help="CSV to write (default: print CSV to stdout)")] = None,
    weights: Annotated[Optional[list[Path]], typer.Option("--weights", help="weights file(s), if not where the cache recorded them (matched by sha256)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    workers: Annotated[Optional[int], typer.Option("--workers")] = None,
    device: Annotated[str, _device_option()] = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """The nearest cached images of any image (cosine similarity of features); images not in the cache
    run through the cache's backbone, as predict runs them."""
    from pipeline.stages.neighbors import COLUMNS, neighbors as run

    rows = run(cache, images, k=k, tap=tap, out=out, weights=weights or [], batch_size=batch_size, workers=workers,
               device=device, progress=progress)
    if out is None:
        writer = csv.DictWriter(sys.stdout, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    else:
        typer.echo(f"wrote {len(rows)} neighbour rows to {out}")


@app.command("heads")
def heads_cmd() -> None:
    """List the heads `fit` can train, per task kind."""
    from pipeline.heads import list_heads
    from pipeline.kinds import list_kinds

    for kind in list_kinds().values():
        typer.echo(f"{kind.name} (label column {kind.column!r}; default {','.join(kind.default_heads)}):")
        for name, doc in list_heads(kind.name).items():
            typer.echo(f"  {name:13s} {doc}")


@cache_app.command("info")
def cache_info(
    files: Annotated[list[Path], typer.Argument(help="cache files (.h5), or folders of them")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (a list, one object per file)")] = False,
) -> None:
    """What is in each cache: backbone, rows valid/failed, taps and dims, feature spec, size on disk."""
    from pipeline.cache import FeatureCache, find_caches

    infos = []
    for file in find_caches(files):
        with FeatureCache(file) as c:
            infos.append({**c.info(), "failures": c.failures})
    if as_json:
        typer.echo(json.dumps(infos, indent=1))
        return
    for k, info in enumerate(infos):
        if k:
            typer.echo("")
        spec = info["spec"]
        typer.echo(f"{info['path']}")
        typer.echo(f"  backbone   {info['backbone']}  (weights sha256 {info['weights_sha256'][:16]}…, {info['weights_source']})")
        typer.echo(f"  source     {info['source']}" + (f"  ({info['source_location']})" if info["source_location"] else ""))
        gone = f", {info['no_longer_listed']} of images the source no longer lists" if info["no_longer_listed"] else ""
        typer.echo(f"  rows       {info['rows']}: {info['valid']} valid, {info['failed']} failed{gone}; complete: {info['complete']}")
        typer.echo("  taps       " + ", ".join(f"{t} ({d})" for t, d in info["taps"].items()) + f"  as {info['dtype']}")
        dc = info["data_config"]
        typer.echo(f"  preprocess {dc['input_size']} {dc['interpolation']} crop {dc['crop_pct']} mean {dc['mean']} std {dc['std']}"
                   if dc else "  preprocess none: embeddings imported with `pipeline cache import`")
        typer.echo(f"  forward    autocast {info['amp']}; test-time augmentation {info['tta'] or 'none'}; decode "
                   f"{spec['decode']}, JPEG draft {'on' if spec['jpeg_draft'] else 'off'}"
                   + (f"; virtual over {info['shards']} shard files" if info["shards"] else ""))
        typer.echo(f"  size       {info['size_bytes'] / 1e6:.2f} MB; schema v{info['schema_version']}; created {info['created']}")
        for sid, stage, reason in info["failures"]:
            typer.echo(f"  failed     {sid} [{stage}] {reason}")


@cache_app.command("verify")
def cache_verify(
    file: Annotated[Path, typer.Argument(help="a cache file (.h5)")],
    data: Annotated[Optional[Path], typer.Option("--data", help="the cache's image folder or manifest, to re-extract a sample of rows from")] = None,
    sample: Annotated[int, typer.Option("--sample", help="rows to re-extract and compare")] = 16,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="weights file, if not where the cache's backbone resolves")] = None,
    device: Annotated[str, _device_option()] = "auto",
) -> None:
    """Check a cache: schema and valid mask (plain h5py), then re-extract a random sample of rows and
    compare them with the stored features. Exit 1 when anything is wrong or has drifted."""
    from pipeline.stages.verify import verify

    report = verify(file, data, sample=sample, seed=seed, weights=weights, device=device)
    typer.echo(f"{report.path}")
    for note in report.notes:
        typer.echo(f"  note     {note}")
    for tap in report.min_cosine:
        typer.echo(f"  {tap:<8} {report.checked_rows} rows re-extracted: min cosine {report.min_cosine[tap]:.5f}, "
                   f"max |diff| {report.max_abs_diff[tap]:.4f}")
    for problem in report.problems:
        typer.echo(f"  PROBLEM  {problem}")
    typer.echo("  ok" if report.ok else f"  {len(report.problems)} problem(s)")
    if not report.ok:
        raise typer.Exit(1)


@cache_app.command("import")
def cache_import(
    file: Annotated[Path, typer.Argument(help="embeddings made elsewhere: a .parquet file or a folder of them (columns id, embedding; optional label, labels, target, split), or a .npy array (rows, dims) with --ids")],
    out: Annotated[Path, typer.Option("--out", help="directory for the cache file")],
    ids: Annotated[Optional[Path], typer.Option("--ids", help="the .npy array's ids, row by row: a CSV with an id column (optional: label, labels, target, split), else one id per line")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="what made the embeddings; the cache's backbone is imported:NAME (default: the file's stem)")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help=f"storage dtype: {_one_of('dtype')}")] = SPEC_INPUTS["dtype"].default,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the cache of an earlier import of the same input (refused otherwise)")] = False,
    chunk_rows: Annotated[int, typer.Option("--chunk-rows", help="rows read, checked and written at a time")] = 8192,
) -> None:
    """Make a feature cache from embeddings computed elsewhere, for fit and audit; there is no backbone
    to run on new images, so predict refuses them."""
    from pipeline.stages.cache_import import import_embeddings

    typer.echo(import_embeddings(file, out, ids, name=name, dtype=dtype, overwrite=overwrite, chunk_rows=chunk_rows).summary())


@cache_app.command("merge")
def cache_merge(
    caches: Annotated[list[Path], typer.Argument(help="caches of one source, backbone and feature spec made apart (files, or folders of them such as a distributed run's *.shards folders)")],
    out: Annotated[Path, typer.Option("--out", help="directory for the merged cache (an existing cache there of the same source and spec gains the rows)")],
) -> None:
    """Join caches made apart (the ranks of a torchrun without a shared file system, each writing into its
    own node's --cache) into one cache; rows matched by id and content hash, as a resumed extraction."""
    from pipeline.stages.cache_merge import merge_caches

    typer.echo(merge_caches(caches, out).summary())


@app.command()
def serve(
    model: Annotated[Path, typer.Argument(help="a fit run folder (its best row), a .skops head, or a fine-tuned model folder")],
    host: Annotated[str, typer.Option("--host", help="address to listen on; 0.0.0.0 opens it to every network the machine is on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    task: Annotated[Optional[str], typer.Option("--task", help="with a run folder: whose best row to serve (default: the first task)")] = None,
    row: Annotated[Optional[int], typer.Option("--row", help="with a run folder: serve this leaderboard row, counted from 1 as in leaderboard.md")] = None,
    weights: Annotated[Optional[list[Path]], typer.Option("--weights", help="weights file(s) to use when the model's are no longer where they were recorded (matched by sha256); repeatable")] = None,
    device: Annotated[str, _device_option()] = "auto",
    max_bytes: Annotated[int, typer.Option("--max-bytes", help="largest request body (all its images together); larger ones get 413")] = 20 * 2 ** 20,
    max_batch: Annotated[int, typer.Option("--max-batch", help="most images in one forward pass")] = 32,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", help="how long a forward pass waits for more requests to join it (those that arrive while one runs join the next)")] = 2.0,
) -> None:
    """Serve a model over HTTP, loaded once: POST /predict (images as multipart uploads in the field
    `file`, repeatable), GET /health, GET /model. Requests that arrive together share a forward pass.
    Stops cleanly on Ctrl-C or SIGTERM."""
    from pipeline.stages.serve import serve as run

    # A server ends on SIGTERM as servers do (killed by the signal, which service managers count as a clean
    # stop; uvicorn re-raises it once shut down), not as an interrupted stage.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    run(model, host=host, port=port, task=task, row=row, weights=weights or [], device=device, max_bytes=max_bytes,
        max_batch=max_batch, max_wait_ms=max_wait_ms)


@app.command()
def export(
    model: Annotated[Path, typer.Argument(help="a fit run folder (its best row), a .skops head, or a fine-tuned model folder")],
    out: Annotated[Path, typer.Option("--out", help="the model file to write; its card goes beside it as OUT.json")],
    format: Annotated[str, typer.Option("--format", help="onnx (onnxruntime and others) or torchscript (torch.jit.load)")] = "onnx",
    task: Annotated[Optional[str], typer.Option("--task", help="with a run folder: whose best row to export (default: the first task)")] = None,
    row: Annotated[Optional[int], typer.Option("--row", help="with a run folder: export this leaderboard row, counted from 1 as in leaderboard.md")] = None,
    weights: Annotated[Optional[list[Path]], typer.Option("--weights", help="weights file(s) to use when the model's are no longer where they were recorded (matched by sha256); repeatable")] = None,
) -> None:
    """Write the backbone, its normalisation and the head as one model file: uint8 RGB images, already
    resized and cropped as the card says, in; the task kind's scores out. Heads that are not a fixed
    tensor function of the features (knn, centroid, sgd) are refused with the reason."""
    from pipeline.stages.export import export_model

    result = export_model(model, out, format=format, task=task, row=row, weights=weights or [])
    typer.echo(f"wrote {result.path} and its card {result.card}")
    typer.echo(f"checked against predict's path on {result.checked} generated images: max |difference| "
               f"{result.max_difference:.2e}")
    for note in result.notes:
        tell("note", note)


def main() -> None:
    """Console entry point: a PipelineError or an OSError becomes one line on stderr and exit status 1
    (Ctrl-C and SIGTERM: see :class:`_Commands`)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops a stage as Ctrl-C does, said the same way
    try:
        app()
    except PipelineError as e:
        tell("error", str(e))
        sys.exit(1)
    except OSError as e:  # a write the file system refused (full, read-only, gone); outputs are written whole or not at all
        reason = os.strerror(e.errno) if e.errno else e.strerror or str(e).splitlines()[0]
        tell("error", reason + (f": {e.filename}" if e.filename else ""))
        sys.exit(1)
    finally:
        _stop_workers()


def _stop_workers() -> None:
    """End joblib's worker processes now, not at interpreter exit: the command's work is done and said,
    and a Ctrl-C during the seconds their shutdown takes at exit would print a traceback and exit 0."""
    executor = getattr(sys.modules.get("joblib.externals.loky.reusable_executor"), "_executor", None)
    if executor is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        executor.shutdown(wait=True, kill_workers=True)


if __name__ == "__main__":
    main()
