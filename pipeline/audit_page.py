"""``audit.html``: an audit's findings on one static page (images inlined, no server): thumbnails of the
most suspicious labels with their given and suggested labels, copies side by side, the
most outlying images, and the map of the embeddings. Thumbnails need the images, which the cache does
not hold: without the data folder the page lists ids."""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path

from .data import load_image
from .files import atomic_path
from .findings import PAGE, AuditResult

THUMB = 150
e = html.escape


class Thumbnails:
    """Inline JPEG thumbnails of images by id, each made once; an image that cannot be read shows why."""

    def __init__(self, images: dict[str, Path]):
        self.images = images
        self._made: dict[str, str] = {}

    def __call__(self, sid: str) -> str:
        if sid not in self._made:
            self._made[sid] = self._make(sid)
        return self._made[sid]

    def _make(self, sid: str) -> str:
        path = self.images.get(sid)
        if path is None:
            return ""
        try:
            img = load_image(path, min_side=THUMB)
        except Exception as err:  # any decode error is that thumbnail's, never the page's
            return f"<div class='nothumb'>unreadable: {e(str(err))}</div>"
        img.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=82)
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        return f"<img class='thumb' alt='{e(sid)}' src='data:image/jpeg;base64,{data}'>"


def write_page(result: AuditResult, images: dict[str, Path], top: int, folder: Path | None = None) -> Path:
    """Write ``audit.html`` into ``folder`` (None: the audit's); ``top`` examples of each finding. The
    files it names are beside it, by name."""
    thumb = Thumbnails(images)
    body = [f"<h1>Data audit: {e(result.out.name)}</h1>",
            f"<p>Written {e(time.strftime('%Y-%m-%d %H:%M:%S %z'))}.</p>",
            "<pre>" + e("\n".join(result.lines(Path()))) + "</pre>"]
    if not images:
        body.append("<p class='note'>No thumbnails: give the images with <code>--data DIR</code> to see them.</p>")
    for t in result.tasks:
        body.append(f"<h2>Label issues: {e(t.task)}</h2><p>{len(t.issues)} flagged by cleanlab from out-of-fold "
                    f"predictions ({e(t.protocol.describe())}); <i>score</i> is cleanlab's label quality (for classes, "
                    "the probability the model gave the label it was given), lowest first.</p>")
        if t.note:
            body.append(f"<p class='note'>{e(t.note)}</p>")
        body.append(_cards(
            (d["id"], thumb(d["id"]), f"given <b>{e(d['given'])}</b> &rarr; suggested <b>{e(d['suggested'])}</b>",
             f"score {d['score']:.3f}" + (f" &middot; {e(d['split'])}" if d["split"] else ""))
            for d in t.issues[:top]))
        if t.leaked:
            body.append(f"<p><b>Possible leakage</b>: {len(t.leaked)} scored images of this task have a copy "
                        f"among the images their model trains on.</p>")
    cross = len(result.cross_split)
    body.append(f"<h2>Copies</h2><p>{len(result.copies)} pairs of images that are one picture ({e(result.copy_rule)}); "
                f"{cross} across train and val/test (listed first, marked <span class='leak'>leak</span>). Then the "
                "pairs whose features alone would call them copies but whose pixels differ, marked "
                "<span class='nocopy'>not a copy</span>.</p>")
    body.append(_pairs(result.duplicates[:top], thumb))
    flagged = result.outliers.where("outlier")
    body.append(f"<h2>Outliers</h2><p>{len(flagged)} images beyond the fence of the outlier score (the mean cosine "
                "distance to their nearest images); the most outlying first.</p>")
    if result.search_said:
        body.append(f"<p>Every image's nearest others (the copies' candidates, the outlier scores) were found by "
                    f"{e(result.search)}.</p>")
    body.append(_cards(
        (o["id"], thumb(o["id"]), f"{e(o['label'])} &middot; score {o['score']:.3f}",
         f"nearest {e(o['nearest_id'])} ({o['nearest_similarity']})") for o in result.outliers[:top]))
    if "map" in result.files:
        data = base64.b64encode(result.files["map"].read_bytes()).decode("ascii")
        body.append(f"<h2>Map ({e(result.map_method)})</h2><p>The embeddings in two dimensions, coloured by label; "
                    f"label issues of the first task ringed in red.</p><img class='map' alt='map' "
                    f"src='data:image/png;base64,{data}'>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>audit: {e(result.out.name)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    path = (result.out if folder is None else folder) / PAGE
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def _cards(items) -> str:
    """A grid of (id, thumbnail html, first line html, second line html) cards."""
    cards = [f"<div class='card'>{img or ''}<div class='id'>{e(sid)}</div><div>{one}</div><div class='sub'>{two}</div></div>"
             for sid, img, one, two in items]
    return "<div class='grid'>" + "".join(cards) + "</div>" if cards else "<p class='note'>Nothing to show.</p>"


def _pairs(pairs: list[dict], thumb: Thumbnails) -> str:
    if not pairs:
        return "<p class='note'>Nothing to show.</p>"
    rows = []
    for d in pairs:
        mark = ("<span class='nocopy'>not a copy</span> " if not d["confirmed"]
                else "<span class='leak'>leak</span> " if d["cross"] else "")
        pixels = f", pixels <b>{d['pixel_similarity']:.4f}</b>" if d["pixel_similarity"] != "" else ""
        rows.append(f"<div class='pair'>{thumb(d['id_a'])}{thumb(d['id_b'])}<div class='pairtext'>{mark}"
                    f"cosine <b>{d['similarity']:.4f}</b>{pixels}<br>{e(d['id_a'])} ({e(d['split_a'] or '-')})<br>"
                    f"{e(d['id_b'])} ({e(d['split_b'] or '-')})</div></div>")
    return "".join(rows)


_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h2{border-bottom:2px solid #ddd;margin-top:32px}pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:170px;border:1px solid #ddd;padding:6px;font-size:12px}
.thumb{max-width:150px;max-height:150px;display:block;margin:0 auto 4px}.id{word-break:break-all;color:#555}
.sub{color:#777;word-break:break-all}.pair{display:flex;gap:8px;align-items:center;border-bottom:1px solid #eee;padding:6px 0}
.pairtext{font-size:12px;word-break:break-all}.leak{background:#c33;color:#fff;padding:1px 5px;border-radius:3px}
.nocopy{background:#888;color:#fff;padding:1px 5px;border-radius:3px}.pair .thumb{margin:0}.note{color:#a60}.nothumb{color:#a33;font-size:11px}.map{max-width:760px;border:1px solid #eee}"""
