"""report: what the artist is about to train on, as pictures: a contact sheet (first, middle and last
frame of every clip with its caption) and an HTML page with every clip playable, its caption,
source and time range, the clips set aside with their reasons, the fades and dissolves left out of
every shot (a strip of frames across each, marked), the inputs skipped, and with a --query every
shot's score. Past PAGE_SIZE clips the page splits into pages, each with its own contact sheet, so
1,000 clips stay reviewable (a page loads 100 videos, not all)."""

from __future__ import annotations

import html
import math
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_prep.manifest import read_jsonl

THUMB_H = 96
TEXT_W = 360
PAD = 6


def clip_thumbs(path: Path, height: int = THUMB_H) -> list[Image.Image]:
    """First, middle and last frame of a clip, scaled to ``height``. A clip that cannot be read
    gives one grey placeholder (the report must still show the rest)."""
    import av

    try:
        with av.open(str(path)) as c:
            frames = [f.to_image() for f in c.decode(video=0)]
    except (av.FFmpegError, OSError):
        frames = []
    if not frames:
        return [Image.new("RGB", (height, height), (90, 90, 90))]
    picks = [frames[0], frames[len(frames) // 2], frames[-1]]
    return [im.resize((max(1, round(im.width * height / im.height)), height)) for im in picks]


def contact_sheet(rows: list[dict], root: Path, out: Path, progress: bool = False) -> Path:
    """One row per clip: three frames and the caption (rejected rows show their reason in red)."""
    from tqdm.auto import tqdm

    font = ImageFont.load_default()
    strips = []
    for r in tqdm(rows, desc="report", unit="clip", disable=not progress):
        thumbs = clip_thumbs(root / r["path"])
        w = sum(t.width for t in thumbs) + PAD * (len(thumbs) + 1) + TEXT_W
        strip = Image.new("RGB", (w, THUMB_H + 2 * PAD), (250, 250, 250))
        x = PAD
        for t in thumbs:
            strip.paste(t, (x, PAD))
            x += t.width + PAD
        draw = ImageDraw.Draw(strip)
        head = f"{Path(r['path']).name}  {r['frames']}f {r['fps']:g}fps {r['width']}x{r['height']}"
        draw.text((x, PAD), head, fill=(60, 60, 60), font=font)
        body = f"SET ASIDE: {r['reason']}" if "reason" in r else r["caption"]
        colour = (180, 30, 30) if "reason" in r else (0, 0, 0)
        draw.multiline_text((x, PAD + 16), "\n".join(textwrap.wrap(body, 58)[:6]), fill=colour, font=font)
        strips.append(strip)
    if not strips:
        strips = [Image.new("RGB", (TEXT_W, 40), (250, 250, 250))]
        ImageDraw.Draw(strips[0]).text((PAD, PAD), "no clips", fill=(0, 0, 0), font=font)
    sheet = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), (255, 255, 255))
    y = 0
    for s in strips:
        sheet.paste(s, (0, y))
        y += s.height
    sheet.save(out)
    return out


def _clip_html(r: dict) -> str:
    e = html.escape
    reason = f'<p class="reason">set aside: {e(r["reason"])}</p>' if "reason" in r else ""
    score = f"query score {r['query_score']:.4f} &middot; " if r.get("query_score") is not None else ""
    return (
        f'<figure><video src="{e(r["path"])}" controls loop muted preload="metadata" width="{r["width"]}"></video>'
        f"<figcaption>{reason}<p>{e(r['caption'])}</p><p class=meta>{score}{e(Path(r['path']).name)} &middot; "
        f"{e(r['source'])} shot {r['shot']}, {r['start_time']:.2f}-{r['end_time']:.2f} s "
        f"(frames {r['start_frame']}-{r['end_frame'] - 1}) &middot; {r['frames']} frames at {r['fps']:g} fps, "
        f"{r['width']}x{r['height']}</p></figcaption></figure>"
    )


# ---------------------------------------------------------------------------------------------
# transitions: what was left out between shots, and why

STRIP_DIR = "transitions"
STRIP_H = 72  # frame height in a strip
STRIP_CLEAN = 2  # clean frames shown on each side
STRIP_INSIDE = 8  # left-out frames shown at most (first and last included)
_KEPT, _LEFT_OUT = (40, 150, 60), (200, 40, 40)


def strip_frames(start: int, end: int, n: int) -> tuple[list[int], list[int], list[int]]:
    """Frame numbers a strip shows for the transition [start, end) of a video of ``n`` frames:
    clean frames before it, frames of it (all, or STRIP_INSIDE spread over it), clean after."""
    inside = list(range(start, end))
    if len(inside) > STRIP_INSIDE:
        inside = sorted({start + round(i * (end - 1 - start) / (STRIP_INSIDE - 1)) for i in range(STRIP_INSIDE)})
    before = [i for i in range(start - STRIP_CLEAN, start) if i >= 0]
    after = [i for i in range(end, end + STRIP_CLEAN) if i < n]
    return before, inside, after


def transition_strip(frames: dict[int, np.ndarray], before: list[int], inside: list[int], after: list[int],
                     title: str, out: Path) -> Path:
    """One row of frames [h, w, 3] RGB, each framed and numbered: green for frames kept in a shot,
    red for the transition's frames (left out of every shot); ``title`` above. Saved as JPEG."""
    font = ImageFont.load_default()
    tiles = []
    for i in before + inside + after:
        im = Image.fromarray(frames[i])
        im = im.resize((max(1, round(im.width * STRIP_H / im.height)), STRIP_H))
        colour = _LEFT_OUT if i in inside else _KEPT
        tile = Image.new("RGB", (im.width + 6, STRIP_H + 20), colour)
        tile.paste(im, (3, 3))
        ImageDraw.Draw(tile).text((4, STRIP_H + 5), f"{i}{'' if i in inside else ' kept'}", fill=(255, 255, 255), font=font)
        tiles.append(tile)
    gap = 8  # pixels between tiles
    width = sum(t.width for t in tiles) + gap * (len(tiles) + 1)
    strip = Image.new("RGB", (max(width, 360), STRIP_H + 46), (250, 250, 250))
    ImageDraw.Draw(strip).text((gap, 6), title, fill=(0, 0, 0), font=font)
    x = gap
    for t in tiles:
        strip.paste(t, (x, 22))
        x += t.width + gap
    out.parent.mkdir(parents=True, exist_ok=True)
    strip.save(out, quality=85)
    return out


def write_transition_strips(root: Path, sources: list[tuple[dict, int, str]], progress: bool = False) -> list[dict]:
    """A strip for every transition of every source (``(shot list as saved by split, display
    rotation, file-name key)`` each) in ``root``/transitions/, and one row per transition for the
    review page.
    A source that can no longer be decoded gets rows without a picture. Old strips are removed."""
    import av
    from tqdm.auto import tqdm

    from data_prep.query import grab_frames

    rows, keep = [], set()
    for shots, rotation, key in tqdm(sources, desc="transitions", unit="file", disable=not progress):
        spans = list(zip(shots.get("transitions", []), shots.get("transition_kinds", [])))
        if not spans:
            continue
        n, times = shots["frames"], shots["frame_times"]
        plans = [strip_frames(a, b, n) for (a, b), _ in spans]
        try:
            got = grab_frames(shots["source"], {i for p in plans for part in p for i in part}, rotation, width=192)
        except (av.FFmpegError, OSError):
            got = {}
        for ((a, b), kind), (before, inside, after) in zip(spans, plans):
            end_t = times[b] if b < n else times[-1] + (times[-1] - times[-2] if n > 1 else 0.0)
            row = {"source": shots["source"], "kind": kind, "start": a, "end": b, "start_time": times[a], "end_time": end_t,
                   "image": None}
            if all(i in got for i in before + inside + after):
                name = f"{STRIP_DIR}/{key}_{a:06d}-{b:06d}.jpg"
                title = (f"{kind}: frames {a}-{b - 1} ({end_t - times[a]:.2f} s) left out; "
                         f"red: in no shot, green: kept")
                transition_strip(got, before, inside, after, title, root / name)
                row["image"] = name
                keep.add(name)
            rows.append(row)
    for f in (root / STRIP_DIR).glob("*.jpg") if (root / STRIP_DIR).is_dir() else []:
        if f"{STRIP_DIR}/{f.name}" not in keep:
            f.unlink()
    return rows


def _transitions_html(rows: list[dict]) -> str:
    e = html.escape
    if not rows:
        return "<h2>Transitions left out (0)</h2><p>No fade or dissolve was left out: shots meet at hard cuts.</p>"
    items = []
    for r in rows:
        pic = (f'<img src="{e(r["image"])}" loading="lazy" alt="frames {r["start"]}-{r["end"] - 1}">' if r["image"]
               else "<p class=reason>(the source can no longer be decoded: no picture)</p>")
        items.append(f'<figure class="transition">{pic}<figcaption class=meta>{e(Path(r["source"]).name)}: {e(r["kind"])}, '
                     f'frames {r["start"]}-{r["end"] - 1}, {r["start_time"]:.2f}-{r["end_time"]:.2f} s</figcaption></figure>')
    return (f"<h2>Transitions left out ({len(rows)})</h2><p>Fades and dissolves mix two pictures, so their frames "
            f"(red) belong to no shot and no clip; the clean frames either side (green) stay in their shots.</p>"
            f"<section>{''.join(items)}</section>")


PAGE_SIZE = 100  # clips per review page (and per contact sheet): a page of videos stays light


def page_name(k: int, stem: str = "report", ext: str = "html") -> str:
    """report.html, report_p2.html, ... (page 1 keeps the plain name)."""
    return f"{stem}.{ext}" if k == 1 else f"{stem}_p{k}.{ext}"


def _nav(k: int, pages: int) -> str:
    if pages == 1:
        return ""
    links = " ".join(f"<b>{i}</b>" if i == k else f'<a href="{page_name(i)}">{i}</a>' for i in range(1, pages + 1))
    return f'<nav class="pages">page {k} of {pages}: {links}</nav>'


def _query_html(query: dict) -> str:
    """The shots a --query scored, best first: thumbnail, source, times, score, kept or dropped."""
    if not query.get("shots"):
        return ""
    e = html.escape
    rows = "".join(
        f'<tr class="{"kept" if r["kept"] else "dropped"}"><td><img src="{e(r["thumb"])}" loading="lazy" height="54" alt=""></td>'
        f'<td>{r["score"]:.4f}</td><td>{"kept" if r["kept"] else "dropped"}</td><td>{e(Path(r["source"]).name)}</td>'
        f'<td>{r["shot"]}</td><td>{r["start_time"]:.2f}-{r["end_time"]:.2f} s</td></tr>'
        for r in query["shots"]
    )
    kept = sum(r["kept"] for r in query["shots"])
    return (
        f'<h2>Query: &ldquo;{e(query["text"])}&rdquo;</h2><p>{kept} of {len(query["shots"])} shots kept ({e(query["rule"])}), '
        f"scored by {e(query['model'])}; best first.</p><details{' open' if len(query['shots']) <= 200 else ''}>"
        f"<summary>every shot and its score</summary><table><tr><th></th><th>score</th><th></th><th>source</th><th>shot</th>"
        f"<th>time</th></tr>{rows}</table></details>"
    )


def write_report(
    root: Path, skipped: list[tuple[str, str]], progress: bool = False, query: dict | None = None, page_size: int = PAGE_SIZE,
    transitions: list[dict] | None = None,
) -> tuple[Path, Path]:
    """report.html (plus report_p2.html ... past ``page_size`` clips) and one contact sheet per page
    (contact_sheet.png, contact_sheet_p2.png ...) in the dataset folder ``root``. Clips for training
    come first, then those set aside; page 1 also shows ``transitions`` (rows of
    :func:`write_transition_strips`). Returns page 1 and its sheet."""
    root = Path(root)
    kept = read_jsonl(root / "manifest.jsonl")
    rejected = read_jsonl(root / "rejected.jsonl") if (root / "rejected.jsonl").is_file() else []
    everything = kept + rejected
    pages = max(1, math.ceil(len(everything) / page_size))
    _remove_old_pages(root, pages)
    for k in range(1, pages + 1):
        chunk = everything[(k - 1) * page_size : k * page_size]
        contact_sheet(chunk, root, root / page_name(k, "contact_sheet", "png"), progress)
        head = _page_head(root, kept, rejected, skipped, k, pages)
        body = _page_body(chunk, query if k == 1 else None, skipped if k == 1 else None, k, pages,
                          transitions if k == 1 else None)
        (root / page_name(k)).write_text(head + body, encoding="utf-8")
    return root / "contact_sheet.png", root / "report.html"


def _remove_old_pages(root: Path, pages: int) -> None:
    """Pages and sheets of an earlier, longer report."""
    for pattern in ("report_p*.html", "contact_sheet_p*.png"):
        for f in root.glob(pattern):
            num = f.stem.rsplit("_p", 1)[-1]
            if num.isdigit() and int(num) > pages:
                f.unlink()


def _page_head(root: Path, kept: list, rejected: list, skipped: list, k: int, pages: int) -> str:
    e = html.escape
    width = max([r["width"] for r in kept + rejected] + [320]) + 20
    sheet = page_name(k, "contact_sheet", "png")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Dataset review: {e(root.name)}{f" ({k}/{pages})" if pages > 1 else ""}</title>
<style>
body{{font-family:sans-serif;margin:1.5em;background:#fafafa}} figure{{display:inline-block;vertical-align:top;
margin:.5em;padding:.5em;background:#fff;border:1px solid #ddd;max-width:{width}px}}
video{{max-width:100%}} .meta{{color:#666;font-size:.85em}} .reason{{color:#b41e1e;font-weight:bold}}
nav.pages{{margin:1em 0}} table{{border-collapse:collapse}} td,th{{padding:2px 8px;text-align:left}}
tr.dropped{{color:#888}} tr.kept td:nth-child(3){{color:#1a7f1a;font-weight:bold}}
figure.transition{{display:block;max-width:none}} figure.transition img{{max-width:100%}}
</style></head><body>
<h1>{e(root.name)}: {len(kept)} clips for training</h1>
<p>{len(rejected)} set aside, {len(skipped)} inputs skipped. Contact sheet of this page: <a href="{sheet}">{sheet}</a>.
Edit a caption by writing <code>clips/&lt;clip&gt;.txt</code>; the next caption run keeps it.</p>
"""


def _page_body(chunk: list[dict], query: dict | None, skipped: list | None, k: int, pages: int,
               transitions: list[dict] | None = None) -> str:
    e = html.escape
    train = [r for r in chunk if "reason" not in r]
    aside = [r for r in chunk if "reason" in r]
    parts = [_nav(k, pages), _query_html(query or {})]
    parts.append(f"<h2>For training ({len(train)} on this page)</h2><section>{''.join(_clip_html(r) for r in train) or '<p>none</p>'}</section>")
    parts.append(f"<h2>Set aside ({len(aside)} on this page)</h2><section>{''.join(_clip_html(r) for r in aside) or '<p>none</p>'}</section>")
    if transitions is not None:
        parts.append(_transitions_html(transitions))
    if skipped is not None:
        items = "".join(f"<li>{e(p)}: {e(r)}</li>" for p, r in skipped)
        parts.append(f"<h2>Inputs skipped ({len(skipped)})</h2><ul>{items or '<li>none</li>'}</ul>")
    parts.append(_nav(k, pages))
    return "\n".join(p for p in parts if p) + "\n</body></html>\n"
