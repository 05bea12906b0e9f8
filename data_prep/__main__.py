"""Command line over data_prep: thin argparse glue; the work is in prepare() and its steps."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from data_prep.options import PrepOptions
from data_prep.pipeline import EXIT_FAILED, EXIT_OK, EXIT_SKIPPED, EXIT_USAGE
from finetune.cli import add_verbose_flag

EPILOG = f"""\
exit status:
  {EXIT_OK}  every input file was used
  {EXIT_SKIPPED}  clips were made, but some inputs were skipped (unreadable, or too short for one clip);
     the summary names them and report.html lists them all
  {EXIT_FAILED}  no clips at all, or an error stopped the run
  {EXIT_USAGE}  bad arguments or options (nothing was done)

examples:
  python -m data_prep prepare footage/ dataset/ --family wan --fps 16 --frames 81 --size 832x480 --trigger mystyle
  python -m data_prep prepare footage/ dataset/ --captioner Qwen/Qwen2.5-VL-7B-Instruct
  python -m data_prep prepare footage/ dataset/ --query "night street, neon" --query-top 20
  python -m data_prep report dataset/
  python -m data_prep push dataset/ --repo me/my-clips --license cc-by-4.0
"""

PUSH_EPILOG = f"""\
exit status:
  {EXIT_OK}  uploaded (or, with --dry-run, the repo folder written)
  {EXIT_FAILED}  not a prepared dataset folder, clips missing, no token, or the upload failed
  {EXIT_USAGE}  bad arguments (a --repo the Hub does not accept); nothing was uploaded

examples:
  python -m data_prep push dataset/ --repo me/my-clips --dry-run repo_preview/
  HF_TOKEN=hf_... python -m data_prep push dataset/ --repo me/my-clips --private --license cc-by-4.0
"""

CLIP = ["family", "frames", "fps", "size", "buckets", "mode", "clips_per_shot", "stride", "crf", "preset", "audio"]
SPLIT = ["detector", "threshold", "min_shot_len", "transitions"]
QUERY = ["query", "query_top", "query_min", "query_model", "query_frames"]
FILTER = ["filter", "dup_distance", "static_threshold", "dark_threshold", "blur_threshold"]
CAPTION = ["captioner", "trigger", "overwrite", "caption_batch", "caption_frames", "caption_prompt", "max_new_tokens", "load_8bit"]


def _add_options(p: argparse.ArgumentParser, names: list[str], title: str) -> None:
    g = p.add_argument_group(title)
    by_name = {f.name: f for f in fields(PrepOptions)}
    defaults = PrepOptions()
    for name in names:
        f = by_name[name]
        default = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        doc = f.metadata["doc"]
        if isinstance(default, bool):
            g.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=f"{doc} (default: {default})")
            continue
        kind = {"frames": int, "clips_per_shot": int, "stride": int, "crf": int, "min_shot_len": int,
                "caption_batch": int, "caption_frames": int, "max_new_tokens": int, "workers": int,
                "query_top": int, "query_frames": int}.get(name)  # fmt: skip
        if kind is None:
            kind = float if name in ("fps", "threshold", "query_min") or isinstance(default, float) else str
        choices = f.metadata.get("choices")
        shown = "" if name == "caption_prompt" else f" (default: {default})"
        g.add_argument(flag, dest=name, type=kind, choices=choices, default=argparse.SUPPRESS, help=doc + shown)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Turn a folder of raw footage into a captioned, reviewed clip dataset (manifest.jsonl) for the trainer. "
        "Every step resumes: finished work is skipped, changed settings redo only what they affect.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help: str, footage: bool, groups: list[tuple[list[str], str]]):
        p = sub.add_parser(name, help=help, description=help, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        if footage:
            p.add_argument("footage", help="folder of videos (searched recursively) or one video file; never modified")
        p.add_argument("dataset", help="output dataset folder (created; re-runs resume in it)")
        for names, title in groups + ([(["workers"], "run")] if footage else []):
            _add_options(p, names, title)
        p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS, help="no progress bars")
        p.add_argument("--json", action="store_true", help="print the summary as JSON too")
        add_verbose_flag(p)
        return p

    cmd("prepare", "run every step: probe, split, cut, filter, caption, manifest, report", True,
        [(CLIP, "clips"), (SPLIT, "shot detection"), (QUERY, "finding shots by text"), (FILTER, "filter"), (CAPTION, "captions")])  # fmt: skip
    cmd("probe", "open every file and record duration, fps, size, rotation, codec, VFR; list unreadable ones", True, [])
    cmd("split", "probe, then detect shots (saved per source in dataset/shots/)", True, [(SPLIT, "shot detection")])
    cmd("cut", "probe, split, then cut and filter clips and write the manifest (captions: trigger only until caption runs)", True,
        [(CLIP, "clips"), (SPLIT, "shot detection"), (QUERY, "finding shots by text"), (FILTER, "filter"), (["trigger"], "captions")])  # fmt: skip
    cmd("filter", "set aside duplicate, static, dark and blurred clips again with new thresholds", False, [(FILTER, "filter"), (["trigger"], "captions")])
    cmd("caption", "caption the kept clips and rewrite the manifest", False, [(CAPTION, "captions")])
    cmd("report", "contact_sheet.png and report.html to review the dataset", False, [])
    push = sub.add_parser(
        "push", help="upload the dataset to the Hugging Face Hub as a dataset repo (one commit)",
        description="Upload the clips the manifest lists, metadata.jsonl, a contact sheet and a dataset card to the "
                    "Hugging Face Hub in one commit; datasets.load_dataset('USER/NAME') and a recipe's "
                    "data.dataset: USER/NAME then read it. The token comes from HF_TOKEN or `hf auth login`.",
        epilog=PUSH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    push.add_argument("dataset", help="a prepared dataset folder")
    push.add_argument("--repo", required=True, metavar="USER/NAME", help="Hub dataset repo to create or update")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--dry-run", metavar="DIR", help="write the repo folder to DIR and upload nothing")
    push.add_argument("--license", help="licence id of the footage for the card (default: other, with a note to check the sources)")
    return parser


STEPS = {
    "prepare": ("probe", "split", "cut", "filter", "caption", "manifest", "report"),
    "probe": ("probe",),
    "split": ("probe", "split"),
    "cut": ("probe", "split", "cut", "filter", "manifest"),
    "filter": ("filter", "manifest"),
    "caption": ("caption", "manifest"),
    "report": ("report",),
}


def main(argv: list[str] | None = None) -> int:
    from data_prep.pipeline import on_dataset, prepare

    args = vars(build_parser().parse_args(argv))
    if args["command"] == "push":
        return _push(args)
    command, as_json = args.pop("command"), args.pop("json")
    args.pop("verbose")
    footage, dataset = args.pop("footage", None), args.pop("dataset")

    def run():
        opts = PrepOptions(**args)
        if footage is not None:
            return prepare(footage, dataset, opts, steps=STEPS[command])
        return on_dataset(dataset, opts, steps=STEPS[command])

    summary, code = _reported(run)
    if summary is None:
        return code
    if command == "probe":
        _print_probe(dataset)
    elif command == "split":
        for src, cuts in summary.cuts.items():
            left = ", ".join(f"{a}-{b - 1} ({kind})" for a, b, kind in summary.transitions.get(src, []))
            print(f"{src}: {len(cuts) + 1} shots, cuts at frames {cuts}"
                  + (f"; in no shot (fades, dissolves): frames {left}" if left else ""))
    print(summary.text())
    if command == "report":
        print(f"review: {dataset}/report.html and {dataset}/contact_sheet.png")
    if as_json:
        print(json.dumps({**summary.__dict__, "exit_code": summary.exit_code}, indent=1))
    return summary.exit_code


def _reported(work):
    """(``work()``, EXIT_OK), or (None, the exit code) after printing a bad option or a user error
    as one ``error:`` line."""
    from finetune.errors import UserError

    from data_prep.options import OptionsError

    try:
        return work(), EXIT_OK
    except OptionsError as e:
        print(f"error: {e}", file=sys.stderr)
        return None, EXIT_USAGE
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return None, EXIT_FAILED


def _push(args: dict) -> int:
    from data_prep.hub import push

    text, code = _reported(lambda: push(args["dataset"], args["repo"], args["private"], args["dry_run"],
                                        args["license"]))
    if text is not None:
        print(text)
    return code


def _print_probe(dataset: str) -> None:
    from pathlib import Path

    for r in json.loads((Path(dataset) / "probe.json").read_text()):
        if r["ok"]:
            extra = [f"rotation {r['rotation']}"] if r["rotation"] else []
            extra += ["VFR"] if r["vfr"] else []
            extra += [f"{r['bit_depth']}-bit"] if r["bit_depth"] != 8 else []
            print(f"{r['path']}: {r['codec']} {r['width']}x{r['height']} {r['fps']:.3f} fps, {r['frames']} frames, "
                  f"{r['duration']:.2f} s" + (", " + ", ".join(extra) if extra else ""))  # fmt: skip
        else:
            print(f"{r['path']}: UNREADABLE: {r['reason']}")


if __name__ == "__main__":
    sys.exit(main())
