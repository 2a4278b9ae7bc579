"""Page 3, router dataset maker: balanced, leak-free router data from task files or a run's adapters; and the
merging of labelled router files (the seed's "fusion" of classifier datasets)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..config import DLPError, RouterDataConfig, check_output, read_json_file
from .common import (PageDefaults, config_fields, config_from_values, count_lines, data_source, file_list, frame,
                     read_jsonl, text_or)
from .jobs import LOCAL_SESSION, run_job

DATA_FIELDS = config_fields(RouterDataConfig)
LABELS_FILE = "labels.json"
SPLITS = ("train", "val", "test")


def router_data_views(out_dir: Path):
    """(records per split and task, first train records) of a router data folder."""
    counts = []
    for split in SPLITS:
        p = out_dir / f"{split}.jsonl"
        if not p.exists():
            continue
        per: dict[str, int] = {}
        for r in read_jsonl(p):
            key = str(r.get("task", r.get("label")))
            per[key] = per.get(key, 0) + 1
        counts += [{"split": split, "task": t, "records": n} for t, n in sorted(per.items())]
    train = out_dir / "train.jsonl"
    preview = read_jsonl(train, 10) if train.exists() else []
    return frame(counts, ["split", "task", "records"]), frame(preview)


def make_data(files, folder, adapters, out, overwrite, *cfg_vals, defaults: PageDefaults = PageDefaults(),
              session: str = LOCAL_SESSION):
    """Make router data; yields (status, counts frame, preview frame) when done. Uploads are copied into a
    temporary folder that is removed afterwards."""
    from ..router import make_router_data

    cfg = config_from_values(RouterDataConfig, DATA_FIELDS, cfg_vals)
    adapters = text_or(adapters, None)
    have_data = bool(file_list(files)) or bool(text_or(folder, None))
    out_dir = Path(text_or(out, defaults.root / "router_data"))
    with tempfile.TemporaryDirectory(prefix="dlp-ui-") as tmp:
        # the library takes exactly one source: task files win, else the adapters' training files
        data_dir = data_source(files, folder, "task datasets", Path(tmp)) if (have_data or not adapters) else None
        path = yield from run_job("router_data", session, lambda j: make_router_data(
            out_dir, adapters=None if data_dir else adapters, data_dir=data_dir, config=cfg,
            overwrite=bool(overwrite)))
    counts, preview = router_data_views(Path(path))
    yield f"done: router data written to `{path}`", counts, preview


def _merge_output(srcs: list[str], out: Path, overwrite: bool) -> None:
    """Refuse an output that would lose data: an existing file (unless ``overwrite``) or one of the inputs."""
    if out.is_dir():
        raise DLPError(f"{out}: is a folder; type the merged file's name")
    check_output(out, overwrite, inputs=srcs)


def _keep_labels(merged_labels: Path, beside: Path) -> None:
    """The merged file's label order must be the ``labels.json`` already beside its output, which is never
    rewritten (other files there are indexed by it); a new one is written only where none exists."""
    if not merged_labels.is_file():
        return
    if beside.is_file():
        if read_json_file(beside) != read_json_file(merged_labels):
            raise DLPError(f"{beside}: lists other tasks or another order than the merged files; choose an output "
                           "folder without a labels.json")
        return
    os.replace(merged_labels, beside)


def merge_files(files, paths, out, overwrite=False, defaults: PageDefaults = PageDefaults()) -> tuple:
    """Merge labelled router files into one; returns (status, first merged records). The merge is written in a
    temporary folder beside the output and moved into place only when it is complete and safe."""
    from ..router import merge_router_files

    srcs = file_list(files) + [p.strip() for p in (paths or "").splitlines() if p.strip()]
    if not srcs:
        raise DLPError("router files: upload files or type paths")
    out_path = Path(text_or(out, defaults.root / "router_data_merged.jsonl")).expanduser()
    _merge_output(srcs, out_path, bool(overwrite))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dlp-merge-", dir=out_path.parent) as tmp:
        merged = Path(merge_router_files(srcs, Path(tmp) / out_path.name))
        _keep_labels(Path(tmp) / LABELS_FILE, out_path.parent / LABELS_FILE)
        _merge_output(srcs, out_path, bool(overwrite))   # again: the output may have appeared meanwhile
        os.replace(merged, out_path)
    total = count_lines(out_path)
    return (f"done: {len(srcs)} file(s) merged into `{out_path}` ({total} records)",
            frame(read_jsonl(out_path, 20)))


def build(defaults: PageDefaults) -> None:
    """The router dataset maker tab (API names: make_router_data, cancel_router_data, merge_router_files)."""
    import gradio as gr

    from .widgets import cancel_button, config_inputs, handler, wire_cancel

    root = defaults.root
    with gr.Row():
        with gr.Column():
            files = gr.File(label="task datasets (one Q/A file per task; .meta.json sidecars too)",
                            file_count="multiple", file_types=[".json", ".jsonl"])
            folder = gr.Textbox(label="…or a folder of task files", placeholder="data/tasks")
            adapters = gr.Textbox(value=defaults.run, label="…or adapters (run folder or adapters.txt)",
                                  info="used when no task files are given: each adapter's training file, labels "
                                       "in adapter order")
            out = gr.Textbox(label="output folder", placeholder=f"blank: {root / 'router_data'}")
            over = gr.Checkbox(label="overwrite an existing output folder", value=False)
        with gr.Column():
            cfg = config_inputs(RouterDataConfig, DATA_FIELDS)
    with gr.Row():
        btn = gr.Button("Make router data", variant="primary")
        cancel = cancel_button()
    status = gr.Markdown("")
    counts = gr.Dataframe(label="records per split and task", interactive=False)
    preview = gr.Dataframe(label="preview (first train records)", interactive=False, wrap=True)

    def make(*vals, session: str = LOCAL_SESSION):
        return (yield from make_data(*vals, defaults=defaults, session=session))

    ev = btn.click(handler(make), [files, folder, adapters, out, over, *cfg], [status, counts, preview],
                   api_name="make_router_data", concurrency_id="heavy", concurrency_limit=1)
    wire_cancel(cancel, "router_data", [ev], status)
    _build_merge(gr, defaults)


def _build_merge(gr, defaults: PageDefaults) -> None:
    from .widgets import handler

    gr.Markdown("### Merge labelled router files\nMerge several `{text, label, task}` JSONL files (e.g. made "
                "separately) into one file; labels are re-indexed by task name.")
    with gr.Row():
        files = gr.File(label="labelled router files (.jsonl)", file_count="multiple", file_types=[".jsonl"])
        paths = gr.Textbox(label="…or paths (one a line)", lines=3)
        out = gr.Textbox(label="output file", placeholder=f"blank: {defaults.root / 'router_data_merged.jsonl'}")
        over = gr.Checkbox(label="overwrite an existing output file", value=False)
    btn = gr.Button("Merge")
    status = gr.Markdown("")
    preview = gr.Dataframe(label="merged records (first 20)", interactive=False, wrap=True)

    def merge(files, paths, out, over):
        return merge_files(files, paths, out, over, defaults=defaults)

    btn.click(handler(merge, progress=False), [files, paths, out, over], [status, preview],
              api_name="merge_router_files")

