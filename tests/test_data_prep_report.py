"""The review page scales: 1,000 clips make ten pages of 100, each with its own contact sheet and
links to the others; a later, shorter report removes the pages it no longer has."""

from __future__ import annotations

import re

from PIL import Image

from data_prep.manifest import jsonl
from data_prep.report import PAGE_SIZE, THUMB_H, write_report


def fake_rows(n: int, start: int = 0) -> list[dict]:
    """Manifest rows whose clips are not on disk (the sheet shows a grey placeholder for each)."""
    return [
        {"path": f"clips/c{i:04d}.mp4", "caption": f"clip {i}", "frames": 17, "fps": 16.0, "width": 64, "height": 48,
         "source": "/footage/long.mp4", "shot": i, "start_time": float(i), "end_time": i + 17 / 16, "start_frame": 24 * i,
         "end_frame": 24 * i + 26}
        for i in range(start, start + n)
    ]  # fmt: skip


def test_a_thousand_clips_make_pages_with_a_sheet_each(tmp_path):
    kept = fake_rows(990)
    rejected = [{**r, "reason": "static (mean change 0.1 < 0.8)"} for r in fake_rows(10, start=990)]
    (tmp_path / "manifest.jsonl").write_text(jsonl(kept))
    (tmp_path / "rejected.jsonl").write_text(jsonl(rejected))
    write_report(tmp_path, [("/footage/bad.mp4", "zero-byte file")])
    assert PAGE_SIZE == 100
    pages = [tmp_path / "report.html"] + [tmp_path / f"report_p{k}.html" for k in range(2, 11)]
    sheets = [tmp_path / "contact_sheet.png"] + [tmp_path / f"contact_sheet_p{k}.png" for k in range(2, 11)]
    assert all(p.is_file() for p in pages + sheets) and not (tmp_path / "report_p11.html").exists()
    seen = []
    for k, (page, sheet) in enumerate(zip(pages, sheets), start=1):
        text = page.read_text()
        seen += re.findall(r'<video src="(clips/c\d+\.mp4)"', text)
        assert text.count("<video") == 100
        assert f"page {k} of 10" in text and all(f'href="report_p{j}.html"' in text for j in range(2, 11) if j != k)
        assert sheet.name in text
        assert Image.open(sheet).height >= THUMB_H * 100
    assert seen == [r["path"] for r in kept + rejected]  # every clip once, training clips first
    assert "zero-byte file" in pages[0].read_text() and "set aside: static" in pages[-1].read_text()

    (tmp_path / "manifest.jsonl").write_text(jsonl(kept[:150]))
    (tmp_path / "rejected.jsonl").write_text("")
    write_report(tmp_path, [])
    assert sorted(p.name for p in tmp_path.glob("report*.html")) == ["report.html", "report_p2.html"]
    assert sorted(p.name for p in tmp_path.glob("contact_sheet*.png")) == ["contact_sheet.png", "contact_sheet_p2.png"]
