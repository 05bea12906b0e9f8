"""prepare: probe -> split -> cut (+ filter) -> caption -> manifest -> report, resumable.

The dataset folder keeps ``prep_state.json``: per step and per item, a fingerprint of everything
that affects the result (source size and mtime, the settings the step uses, the fingerprint of the
step before). A step skips items whose fingerprint matches, so a second run does no work and a
changed setting redoes only what depends on it. Nothing in the footage folder is ever written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.caption import CaptionItem, apply_trigger, make_captioner
from data_prep.manifest import caption_trigger, dataset_card, jsonl, manifest_row, metadata_row, write_if_changed
from data_prep.options import PrepOptions, family_facts, resolve_clip_settings
from data_prep.probe import ProbeResult, list_videos, probe_file
from data_prep.split import SPLIT_VERSION, ShotList, default_threshold, detect_shots

STATE_FILE = "prep_state.json"
STATE_VERSION = 1
ALL_STEPS = ("probe", "split", "cut", "filter", "caption", "manifest", "report")

# Exit statuses of the command line (documented in its --help).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SKIPPED = 0, 1, 2, 3


def fingerprint(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Summary:
    """What a run found and did. ``*_done``/``*_written``/``*_made`` count work done in this run
    (zero on a run that had nothing to redo); the others describe the dataset as it now is."""

    files_found: int = 0
    files_probed: int = 0
    files_split: int = 0
    clips_written: int = 0
    captions_made: int = 0
    manifest_written: bool = False
    report_written: bool = False
    clips: int = 0  # in the manifest
    rejected: int = 0
    human_captions: int = 0
    short_shots: int = 0
    query_shots: int = 0  # shots scored against --query (0: no query)
    query_kept: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason): inputs with no clips
    cuts: dict[str, list[int]] = field(default_factory=dict)  # source -> first frame of each new shot
    # source -> [start, end, kind] of each fade and dissolve left out of every shot
    transitions: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)
    dataset: str = ""
    makes_clips: bool = True  # False for probe/split alone: success then means usable files, not clips

    @property
    def exit_code(self) -> int:
        usable = self.clips if self.makes_clips else self.files_found - len(self.skipped)
        if usable == 0 and (self.skipped or self.files_found == 0):
            return EXIT_FAILED
        return EXIT_SKIPPED if self.skipped else EXIT_OK

    def text(self) -> str:
        lines = [
            f"{self.files_found} files: {self.files_found - len(self.skipped)} used, {len(self.skipped)} skipped; "
            f"{self.clips} clips in the manifest, {self.rejected} set aside; {self.short_shots} shots too short for a clip",
            f"this run: probed {self.files_probed}, split {self.files_split}, wrote {self.clips_written} clips, "
            f"made {self.captions_made} captions ({self.human_captions} written by a person kept)",
        ]
        if self.query_shots:
            lines.append(f"query: kept {self.query_kept} of {self.query_shots} shots (scores in report.html)")
        if self.skipped:
            head = ", ".join(f"{Path(p).name} ({r})" for p, r in self.skipped[:3])
            more = ", ..." if len(self.skipped) > 3 else ""
            lines.append(f"{len(self.skipped)} of {self.files_found} files skipped: {head}{more}")
        if self.dataset:
            lines.append(f"dataset: {self.dataset}/manifest.jsonl; review it with: python -m data_prep report {self.dataset}")
        return "\n".join(lines)


class Dataset:
    """The dataset folder and its run state."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.clip_dir = self.root / "clips"
        self.shot_dir = self.root / "shots"
        self.state_path = self.root / STATE_FILE
        self.state = {"version": STATE_VERSION, "probe": {}, "split": {}, "clips": {}, "captions": {}, "skipped": {}}
        if self.state_path.is_file():
            loaded = json.loads(self.state_path.read_text())
            if loaded.get("version") == STATE_VERSION:
                self.state.update(loaded)

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.state_path)


# ---------------------------------------------------------------------------------------------
# steps


def run_probe(ds: Dataset, footage: Path, opts: PrepOptions, summary: Summary) -> list[ProbeResult]:
    """Probe every video under ``footage``, reusing results for files whose size and mtime match."""
    from tqdm.auto import tqdm

    paths = list_videos(footage)
    summary.files_found = len(paths)
    results, state = [], {}
    for p in tqdm(paths, desc="probe", unit="file", disable=not opts.progress):
        st = p.stat()
        fp = fingerprint(st.st_size, st.st_mtime)
        old = ds.state["probe"].get(str(p))
        if old and old["fp"] == fp:
            res = ProbeResult.from_dict(old["result"])
        else:
            res = probe_file(p)
            summary.files_probed += 1
        state[str(p)] = {"fp": fp, "result": res.to_dict()}
        results.append(res)
    ds.state["probe"] = state
    write_if_changed(ds.root / "probe.json", json.dumps([r.to_dict() for r in results], indent=1))
    return results


def parallel_map(fn, items: list, workers: int, desc: str = "", progress: bool = False, unit: str = "file") -> list:
    """``[fn(x) for x in items]``, a few files at once on threads (PyAV's decoder, swscale and
    x264 release the GIL, so two files overlap one's Python work with the other's C work)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    n = min(len(items), workers or os.cpu_count() or 1)
    if n <= 1:
        return [fn(x) for x in tqdm(items, desc=desc, unit=unit, disable=not progress or not items)]
    with ThreadPoolExecutor(n) as pool, tqdm(total=len(items), desc=desc, unit=unit, disable=not progress) as bar:
        futures = [pool.submit(fn, x) for x in items]
        for f in futures:
            f.add_done_callback(lambda _: bar.update(1))
        return [f.result() for f in futures]


def run_split(ds: Dataset, probes: list[ProbeResult], opts: PrepOptions, summary: Summary, footage: Path) -> dict[str, ShotList]:
    """Shots of every readable source, saved as shots/<key>.json; reused when the file and the
    detector settings are unchanged. Files are decoded ``opts.workers`` at a time."""
    from data_prep.cut import source_key

    threshold = opts.threshold if opts.threshold is not None else default_threshold(opts.detector)
    out: dict[str, ShotList] = {}
    state: dict[str, dict] = {}
    ds.shot_dir.mkdir(parents=True, exist_ok=True)
    good = [p for p in probes if p.ok]
    todo: list[ProbeResult] = []
    for pr in good:
        fp = fingerprint(ds.state["probe"][pr.path]["fp"], opts.detector, threshold, opts.min_shot_len, opts.transitions,
                         SPLIT_VERSION)
        shot_file = ds.shot_dir / f"{source_key(pr.path, footage)}.json"
        old = ds.state["split"].get(pr.path)
        if old and old["fp"] == fp and shot_file.is_file():
            out[pr.path] = ShotList.from_dict(json.loads(shot_file.read_text()))
        else:
            todo.append(pr)
        state[pr.path] = {"fp": fp, "file": shot_file.name}
    at_once = min(len(todo), opts.workers or os.cpu_count() or 1)
    threads = max(1, (os.cpu_count() or 1) // max(1, at_once))  # the cores, shared by the files decoded at once
    detect = lambda pr: detect_shots(pr, opts.detector, threshold, opts.min_shot_len, opts.transitions, threads)  # noqa: E731
    for pr, shots in zip(todo, parallel_map(detect, todo, opts.workers, desc="split", progress=opts.progress)):
        (ds.shot_dir / state[pr.path]["file"]).write_text(json.dumps(shots.to_dict()))
        summary.files_split += 1
        out[pr.path] = shots
    out = {pr.path: out[pr.path] for pr in good}
    summary.cuts.update({path: shots.cuts for path, shots in out.items()})
    summary.transitions.update({path: [(a, b, kind) for (a, b), kind in zip(shots.transitions, shots.transition_kinds)]
                                for path, shots in out.items()})
    ds.state["split"] = state
    return out


def run_query(
    ds: Dataset, probes: list[ProbeResult], shots: dict[str, ShotList], opts: PrepOptions, summary: Summary, footage: Path
) -> dict[str, set[int]] | None:
    """Score every shot against ``opts.query`` and return, per source, the shot indices to keep
    (None without a query: keep all). Every score, kept or not, is recorded in the state (best
    first) for the manifest and the review page."""
    import numpy as np

    from data_prep.cut import source_key
    from data_prep.query import ShotScorer, match_scores, select_shots

    if not opts.query.strip():
        ds.state["query"] = {}
        return None
    scorer = ShotScorer(opts.query_model, opts.load_8bit)
    embs = _shot_embeddings(ds, probes, shots, opts, footage, scorer)
    text = scorer.text_embedding(opts.query)
    scale, bias = scorer.scale_bias
    scores: dict[tuple[str, int], float] = {}
    for path, e in embs.items():
        got = match_scores(e, text, scale, bias) if e.shape[1] == text.shape[0] else np.zeros(len(e))
        scores.update({(path, s.index): float(v) for s, v in zip(shots[path].shots, got)})
    top, min_score = opts.query_rule
    keep = select_shots(scores, top, min_score)
    by_index = {(path, s.index): s for path in embs for s in shots[path].shots}
    rows = [
        {"source": path, "shot": idx, "start_time": by_index[path, idx].start_time, "end_time": by_index[path, idx].end_time,
         "score": round(scores[path, idx], 6), "kept": (path, idx) in keep,
         "thumb": f"query/{source_key(path, footage)}_s{idx:03d}.jpg"}
        for path, idx in sorted(scores, key=lambda k: (-scores[k], k))
    ]  # fmt: skip
    rule = " and ".join(([f"best {top}"] if top is not None else []) + ([f"score >= {min_score:g}"] if min_score is not None else []))
    ds.state["query"] = {"text": opts.query, "model": opts.query_model, "rule": rule, "shots": rows}
    summary.query_shots, summary.query_kept = len(scores), len(keep)
    out: dict[str, set[int]] = {path: set() for path in embs}
    for path, idx in keep:
        out[path].add(idx)
    return out


def _shot_embeddings(ds: Dataset, probes: list[ProbeResult], shots: dict[str, ShotList], opts: PrepOptions, footage: Path, scorer) -> dict:
    """Per readable source, its shots' image embeddings [S, D], from dataset/query/<key>.npz while
    the shots and the model are unchanged (so a new query text costs one text encoding)."""
    import numpy as np

    from data_prep.cut import source_key
    from data_prep.query import embed_source

    qdir = ds.root / "query"
    cache = ds.state.setdefault("query_embeddings", {})
    embs: dict[str, np.ndarray] = {}
    for pr in (p for p in probes if p.ok):
        key = source_key(pr.path, footage)
        fp = fingerprint(ds.state["split"][pr.path]["fp"], opts.query_model, opts.query_frames)
        file = qdir / f"{key}.npz"
        if cache.get(pr.path) == fp and file.is_file():
            embs[pr.path] = np.load(file)["embeddings"]
            continue
        embs[pr.path] = embed_source(scorer, shots[pr.path], pr.rotation, opts.query_frames, qdir, key)
        np.savez(file, embeddings=embs[pr.path])
        cache[pr.path] = fp
    return embs


def run_cut(
    ds: Dataset,
    probes: list[ProbeResult],
    shots: dict[str, ShotList],
    opts: PrepOptions,
    summary: Summary,
    footage: Path,
    keep: dict[str, set[int]] | None = None,
) -> None:
    """Plan clips for every shot (of ``keep``'s shots when a query chose some) and write the ones
    whose fingerprint changed; remove stale clips."""
    import av
    from tqdm.auto import tqdm

    from data_prep.cut import plan_clips, source_key, write_clips
    from data_prep.filter import clip_stats
    from finetune.errors import DataError
    from finetune.video import has_audio

    facts = family_facts(opts.family)
    fps, buckets = resolve_clip_settings(opts, facts)
    old_clips = ds.state["clips"]
    new_clips: dict[str, dict] = {}
    todo: list[tuple[ProbeResult, list]] = []
    skipped: dict[str, str] = {}
    for pr in probes:
        if not pr.ok:
            continue
        sl = shots[pr.path]
        if keep is not None:
            if not keep[pr.path]:
                continue  # the query kept none of its shots: not an error
            sl = dataclasses.replace(sl, shots=[s for s in sl.shots if s.index in keep[pr.path]])
        plans, short = plan_clips(
            sl, pr, source_key(pr.path, footage), opts.frames, fps, buckets, opts.mode, opts.clips_per_shot, opts.stride
        )
        summary.short_shots += len(short)
        if not plans:
            longest = max((s.end_time - s.start_time for s in sl.shots), default=0.0)
            skipped[pr.path] = (
                f"too short: longest shot {longest:.2f} s ({sl.frames} frames), one clip of {opts.frames} frames "
                f"at {fps:g} fps needs {(opts.frames - 1) / fps:.2f} s"
            )
            continue
        src_fp = ds.state["probe"][pr.path]["fp"]  # not the split's: other detector, same shots, same clips
        pending = []
        for p in plans:
            fp = fingerprint(src_fp, p.indices, p.width, p.height, p.fps, pr.rotation, opts.crf, opts.preset, opts.audio)
            old = old_clips.get(p.name)
            entry = {"fp": fp, "plan": {k: v for k, v in p.to_dict().items() if k != "indices"}, "stats": None}
            if old and old["fp"] == fp and old.get("stats") and (ds.clip_dir / p.name).is_file():
                entry["stats"] = old["stats"]
                entry["audio"] = old.get("audio", False)
            else:
                pending.append(p)
            new_clips[p.name] = entry
        if pending:
            todo.append((pr, pending))
    _remove_stale(ds, set(old_clips) - set(new_clips))
    bar = tqdm(total=sum(len(p) for _, p in todo), desc="cut", unit="clip", disable=not opts.progress)

    def cut_one(item):
        pr, pending = item
        try:
            return write_clips(pr, pending, ds.clip_dir, opts.crf, opts.preset, on_done=lambda p: bar.update(1),
                               audio=opts.audio)
        except (av.FFmpegError, DataError) as err:  # DataError: the source's sound cannot be decoded
            return err

    for (pr, pending), samples in zip(todo, parallel_map(cut_one, todo, opts.workers)):
        if isinstance(samples, (av.FFmpegError, DataError)):
            skipped[pr.path] = f"decoding failed while cutting ({samples}); the file is probably truncated"
            for p in pending:
                new_clips.pop(p.name, None)
            continue
        for name, frames in samples.items():
            new_clips[name]["stats"] = clip_stats(frames)
            new_clips[name]["audio"] = has_audio(ds.clip_dir / name)
            summary.clips_written += 1
    bar.close()
    ds.state["clips"] = new_clips
    ds.state["skipped"] = skipped
    ds.state["cut_settings"] = {
        "family": facts.name, "frame rule": facts.frame_rule.describe(), "frames": opts.frames, "fps": fps,
        "buckets": ", ".join(f"{w}x{h}" for w, h in buckets), "mode": opts.mode, "detector": opts.detector,
        "audio": "kept (48 kHz stereo AAC)" if opts.audio else "dropped (--no-audio)",
        **({"query": f"{opts.query} ({opts.query_model})"} if opts.query.strip() else {}),
    }  # fmt: skip


def _remove_stale(ds: Dataset, names: set[str]) -> None:
    """Delete clips this tool wrote that the current settings no longer plan (never a person's .txt)."""
    for name in names:
        (ds.clip_dir / name).unlink(missing_ok=True)
        cap = ds.state["captions"].pop(name, None)
        txt = ds.clip_dir / (Path(name).stem + ".txt")
        if cap and cap.get("by") != "human" and txt.is_file() and txt.read_text(encoding="utf-8") == cap["caption"]:
            txt.unlink()


def run_filter(ds: Dataset, opts: PrepOptions) -> dict[str, str]:
    from data_prep.filter import find_rejects

    clips = sorted(ds.state["clips"].items(), key=lambda kv: _order(kv[1]["plan"]))
    if not opts.filter:
        rejects = {}
    else:
        rejects = find_rejects(
            [(n, c["stats"]) for n, c in clips if c.get("stats")],
            opts.dup_distance, opts.static_threshold, opts.dark_threshold, opts.blur_threshold,
        )  # fmt: skip
    ds.state["rejected"] = rejects
    return rejects


def _order(plan: dict) -> tuple:
    return (plan["source"], plan["shot"], plan["start_frame"])


def _txt_path(ds: Dataset, name: str) -> Path:
    return ds.clip_dir / (Path(name).stem + ".txt")


def run_caption(ds: Dataset, opts: PrepOptions, summary: Summary) -> None:
    """Caption every kept clip whose clip or captioner changed. A clips/<clip>.txt that this tool
    did not write is a person's caption: kept (the trigger is still applied) unless overwrite."""
    from tqdm.auto import tqdm

    captioner = make_captioner(opts)
    caps = ds.state["captions"]
    rejected = ds.state.get("rejected", {})
    todo: list[tuple[str, str]] = []
    for name, clip in sorted(ds.state["clips"].items(), key=lambda kv: _order(kv[1]["plan"])):
        if name in rejected:
            continue
        txt = _txt_path(ds, name)
        old = caps.get(name)
        human = txt.is_file() and (old is None or old.get("by") == "human" or txt.read_text(encoding="utf-8") != old["caption"])
        if human and not opts.overwrite:
            body = txt.read_text(encoding="utf-8").strip()
            caps[name] = {"fp": None, "body": body, "caption": apply_trigger(body, opts.trigger), "by": "human"}
            continue
        source = clip["plan"]["source"]
        side = Path(source).with_suffix(".txt")
        side_fp = (side.stat().st_size, side.stat().st_mtime) if side.is_file() else None
        fp = fingerprint(clip["fp"], captioner.fingerprint, side_fp if opts.captioner == "template" else None)
        if old and old.get("fp") == fp and old.get("by") != "human":
            _set_caption(ds, name, old["body"], old["by"], fp, opts.trigger)
        else:
            todo.append((name, fp))
    by = "template" if opts.captioner == "template" else f"vlm:{opts.captioner}"
    ds.state["caption_settings"] = {"captioner": opts.captioner, "trigger": opts.trigger or "-"}
    bar = tqdm(total=len(todo), desc="caption", unit="clip", disable=not opts.progress)
    step = max(1, opts.caption_batch)
    for b in range(0, len(todo), step):
        batch = todo[b : b + step]
        items = [
            CaptionItem(ds.clip_dir / n, ds.state["clips"][n]["plan"]["source"], ds.state["clips"][n]["plan"]["frames"])
            for n, _ in batch
        ]
        for (name, fp), body in zip(batch, captioner.caption(items)):
            _set_caption(ds, name, body, by, fp, opts.trigger)
            summary.captions_made += 1
        bar.update(len(batch))
        ds.save()  # a long captioning run can be stopped and resumed
    bar.close()


def _set_caption(ds: Dataset, name: str, body: str, by: str, fp: str, trigger: str) -> None:
    caption = apply_trigger(body, trigger)
    ds.state["captions"][name] = {"fp": fp, "body": body, "caption": caption, "by": by}
    write_if_changed(_txt_path(ds, name), caption)


def run_manifest(ds: Dataset, opts: PrepOptions, summary: Summary) -> None:
    """manifest.jsonl (kept clips), rejected.jsonl (with reasons), README.md, and metadata.jsonl
    (the kept clips again, as the ``videofolder`` builder of Hugging Face ``datasets`` reads them)."""
    rows, rejected = [], []
    rej = ds.state.get("rejected", {})
    caps = ds.state["captions"]
    scores = {(r["source"], r["shot"]): r["score"] for r in ds.state.get("query", {}).get("shots", [])}
    for name, clip in sorted(ds.state["clips"].items(), key=lambda kv: _order(kv[1]["plan"])):
        cap = caps.get(name, {}).get("caption", apply_trigger("", opts.trigger))
        row = manifest_row(clip["plan"], cap, f"clips/{name}", clip.get("audio", False))
        if scores:
            row["query_score"] = scores.get((clip["plan"]["source"], clip["plan"]["shot"]))
        if name in rej:
            rejected.append({**row, "reason": rej[name]})
        else:
            rows.append(row)
    summary.clips, summary.rejected = len(rows), len(rejected)
    summary.human_captions = sum(1 for n in caps if caps[n].get("by") == "human" and n not in rej)
    skipped = _skipped(ds)
    summary.manifest_written = write_if_changed(ds.root / "manifest.jsonl", jsonl(rows))
    trigger = caption_trigger(ds.state, opts.trigger)
    write_if_changed(ds.root / "metadata.jsonl", jsonl([metadata_row(r, trigger) for r in rows]))
    write_if_changed(ds.root / "rejected.jsonl", jsonl(rejected))
    settings = dict(ds.state.get("cut_settings", {}))
    settings.update(ds.state.get("caption_settings", {}))
    write_if_changed(ds.root / "README.md", dataset_card(rows, rejected, settings, skipped))


def _skipped(ds: Dataset) -> list[tuple[str, str]]:
    """Inputs that gave no clips: unreadable ones and those too short or failing to decode."""
    out = [(p, e["result"]["reason"]) for p, e in ds.state["probe"].items() if not e["result"]["ok"]]
    out += list(ds.state.get("skipped", {}).items())
    return sorted(out)


def run_report(ds: Dataset, opts: PrepOptions, summary: Summary) -> None:
    from data_prep.report import write_report, write_transition_strips

    query = ds.state.get("query", {})
    sources = _saved_shots(ds)
    spans = [(s["source"], s.get("transitions", [])) for s, _, _ in sources]
    fp = fingerprint((ds.root / "manifest.jsonl").read_text(), (ds.root / "rejected.jsonl").read_text(), _skipped(ds), query,
                     spans)  # fmt: skip
    if ds.state.get("report_fp") == fp and (ds.root / "report.html").is_file():
        return
    strips = write_transition_strips(ds.root, sources, progress=opts.progress)
    write_report(ds.root, _skipped(ds), progress=opts.progress, query=query, transitions=strips)
    ds.state["report_fp"] = fp
    summary.report_written = True


def _saved_shots(ds: Dataset) -> list[tuple[dict, int, str]]:
    """(shot list as split saved it, display rotation, file-name key) of every source split for
    this dataset."""
    out = []
    for path, entry in sorted(ds.state.get("split", {}).items()):
        file = ds.shot_dir / entry["file"]
        if file.is_file():
            rotation = ds.state["probe"].get(path, {}).get("result", {}).get("rotation", 0)
            out.append((json.loads(file.read_text()), rotation, file.stem))
    return out


# ---------------------------------------------------------------------------------------------


def prepare(footage: str | Path, out: str | Path, options: PrepOptions | None = None, steps=ALL_STEPS) -> Summary:
    """Run ``steps`` (default all) from the footage folder (or one file) into the dataset folder.

    Returns a :class:`Summary`. Raises OptionsError for bad options (before any work), and
    UserError when the footage folder is missing.
    """
    from finetune.errors import UserError

    opts = options or PrepOptions()
    opts.check()
    footage = Path(footage)
    if not footage.exists():
        raise UserError(f"footage folder {footage} does not exist (give a folder of videos or one video file)")
    if "cut" in steps:  # a wrong frame count or size fails now, not after probing and splitting
        resolve_clip_settings(opts, family_facts(opts.family))
    ds = Dataset(out)
    ds.root.mkdir(parents=True, exist_ok=True)
    summary = Summary(dataset=str(out), makes_clips="cut" in steps)
    probes = run_probe(ds, footage, opts, summary)
    ds.save()
    if "split" in steps or "cut" in steps:
        shots = run_split(ds, probes, opts, summary, footage)
        ds.save()
    if "cut" in steps:
        keep = run_query(ds, probes, shots, opts, summary, footage)
        ds.save()
        run_cut(ds, probes, shots, opts, summary, footage, keep)
        ds.save()
    return finish(ds, opts, summary, steps)


def finish(ds: Dataset, opts: PrepOptions, summary: Summary, steps=ALL_STEPS) -> Summary:
    """The steps that need only the dataset folder: filter, caption, manifest, report."""
    if "filter" in steps:
        run_filter(ds, opts)
    if "caption" in steps:
        run_caption(ds, opts, summary)
    if "manifest" in steps or "caption" in steps:
        run_manifest(ds, opts, summary)
    if "report" in steps:
        run_report(ds, opts, summary)
    ds.save()
    if "manifest" not in steps and "caption" not in steps:
        rej = ds.state.get("rejected", {})
        summary.clips = sum(1 for n in ds.state["clips"] if n not in rej)
        summary.rejected = sum(1 for n in ds.state["clips"] if n in rej)
    summary.skipped = _skipped(ds)
    if not summary.files_found:
        summary.files_found = len(ds.state["probe"])
    return summary


def on_dataset(out: str | Path, options: PrepOptions | None = None, steps=("caption", "manifest", "report")) -> Summary:
    """Run steps that need only an existing dataset folder (caption, filter, manifest, report)."""
    from finetune.errors import UserError

    opts = options or PrepOptions()
    opts.check()
    ds = Dataset(out)
    if not ds.state_path.is_file():
        raise UserError(f"{out}: not a dataset folder ({STATE_FILE} missing); run: python -m data_prep prepare footage/ {out}")
    return finish(ds, opts, Summary(dataset=str(out)), steps)
