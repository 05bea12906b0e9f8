"""report: what the artist is about to train on, as pictures: a contact sheet (first, middle and last
frame of every clip with its caption) and an HTML page with every clip playable, its caption,
source and time range, the clips set aside with their reasons, and the inputs skipped."""

from __future__ import annotations

import html
import textwrap
from pathlib import Path

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
    return (
        f'<figure><video src="{e(r["path"])}" controls loop muted preload="metadata" width="{r["width"]}"></video>'
        f"<figcaption>{reason}<p>{e(r['caption'])}</p><p class=meta>{e(Path(r['path']).name)} &middot; "
        f"{e(r['source'])} shot {r['shot']}, {r['start_time']:.2f}-{r['end_time']:.2f} s "
        f"(frames {r['start_frame']}-{r['end_frame'] - 1}) &middot; {r['frames']} frames at {r['fps']:g} fps, "
        f"{r['width']}x{r['height']}</p></figcaption></figure>"
    )


def write_report(root: Path, skipped: list[tuple[str, str]], progress: bool = False) -> tuple[Path, Path]:
    """contact_sheet.png and report.html in the dataset folder ``root``."""
    root = Path(root)
    kept = read_jsonl(root / "manifest.jsonl")
    rejected = read_jsonl(root / "rejected.jsonl") if (root / "rejected.jsonl").is_file() else []
    sheet = contact_sheet(kept + rejected, root, root / "contact_sheet.png", progress)
    e = html.escape
    skipped_html = "".join(f"<li>{e(p)}: {e(r)}</li>" for p, r in skipped)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Dataset review: {e(root.name)}</title>
<style>
body{{font-family:sans-serif;margin:1.5em;background:#fafafa}} figure{{display:inline-block;vertical-align:top;
margin:.5em;padding:.5em;background:#fff;border:1px solid #ddd;max-width:{max([r["width"] for r in kept + rejected] + [320]) + 20}px}}
video{{max-width:100%}} .meta{{color:#666;font-size:.85em}} .reason{{color:#b41e1e;font-weight:bold}}
</style></head><body>
<h1>{e(root.name)}: {len(kept)} clips for training</h1>
<p>{len(rejected)} set aside, {len(skipped)} inputs skipped. Contact sheet: <a href="contact_sheet.png">contact_sheet.png</a>.
Edit a caption by writing <code>clips/&lt;clip&gt;.txt</code>; the next caption run keeps it.</p>
<section>{"".join(_clip_html(r) for r in kept)}</section>
<h2>Set aside ({len(rejected)})</h2>
<section>{"".join(_clip_html(r) for r in rejected) or "<p>none</p>"}</section>
<h2>Inputs skipped ({len(skipped)})</h2>
<ul>{skipped_html or "<li>none</li>"}</ul>
</body></html>
"""
    page_path = root / "report.html"
    page_path.write_text(page, encoding="utf-8")
    return sheet, page_path
