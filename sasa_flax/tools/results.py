"""One table over many runs: how an ablation sweep is read (``report --results``).

A run's workdir is read through ``run.Workdir`` (the run record, the evaluation
results, the checkpoint steps: how far a running or stopped run got) and its TensorBoard
events (``train/images_per_sec`` per log line, ``eval/top1`` and ``eval/top5`` per
periodic evaluation). Running and unfinished runs are read as far as they got.
"""

from __future__ import annotations

import csv
import io
import json
import statistics

from sasa_flax import config_lib
from sasa_flax.errors import UserError
from sasa_flax.run import Workdir


class NotARun(UserError):
    """A folder without a run record: not a training run, or one not yet started."""


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _scalars(workdir: Workdir) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars of a workdir: tag -> [(step, value)], in step order."""
    from sasa_flax.quiet_tensorflow import tf

    out: dict[str, list[tuple[int, float]]] = {}
    for events in workdir.event_files():
        try:
            for record in tf.data.TFRecordDataset(str(events)):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    if value.HasField("tensor"):
                        array = tf.make_ndarray(value.tensor)
                        if array.shape != () or array.dtype.kind not in "fiub":
                            continue  # hyperparameters, text: not a scalar
                        number = float(array)
                    else:
                        number = float(value.simple_value)
                    out.setdefault(value.tag, []).append((int(event.step), number))
        except tf.errors.DataLossError:  # a file still being written: what was read counts
            pass
    return {tag: sorted(points) for tag, points in out.items()}


def paper_numbers(config_spec: str) -> dict:
    """The paper's numbers a config file declares for this argument (``PAPER_ROWS``)."""
    if not config_spec:
        return {}
    path, _, arg = config_spec.partition(":")
    try:
        module = config_lib.load_config_module(path)
    except Exception:  # noqa: BLE001 - a config file moved or renamed: no paper number
        return {}
    return dict(getattr(module, "PAPER_ROWS", {}).get(arg, {}))


def read_run(workdir: str) -> dict:
    """What one workdir says about its run (missing pieces are None)."""
    run = Workdir.of(workdir)
    if not run.is_dir():
        raise FileNotFoundError(f"{workdir} is not a directory; pass training workdirs.")
    record = run.run_record()
    if not record.get("config"):
        raise NotARun(
            f"{workdir} has no {Workdir.RUN_RECORD}: not a training run, or one that has not "
            "started yet (train.py writes it once its checks pass)."
        )
    evals = run.eval_results()
    scalars = _scalars(run)
    checkpoints = run.checkpoint_steps()
    logged = [step for points in scalars.values() for step, _ in points]
    final = evals[max(evals)] if evals else {}

    def best(metric):
        values = [v for _, v in scalars.get(f"eval/{metric}", [])]
        values += [e[metric] for e in evals.values() if metric in e]
        return max(values) if values else None

    speeds = [v for _, v in scalars.get("train/images_per_sec", [])]
    per_device = [v for _, v in scalars.get("train/images_per_sec_per_device", [])]
    paper = paper_numbers(record.get("config_spec", ""))
    top1 = final.get("top1")
    return dict(
        workdir=str(workdir),
        config_spec=record.get("config_spec", ""),
        overrides=record.get("overrides", []),
        config=_flatten(record.get("config", {})),
        params=record.get("params"),
        flops=record.get("flops"),
        steps_done=max([*checkpoints, *logged, *evals], default=0),
        total_steps=record.get("total_steps"),
        top1=top1,
        top5=final.get("top5"),
        best_top1=best("top1"),
        best_top5=best("top5"),
        images_per_sec=statistics.median(speeds) if speeds else None,
        # Measured in the run (the median of its log lines), on its own devices.
        images_per_sec_per_device=statistics.median(per_device) if per_device else None,
        devices=record.get("devices"),
        device_kind=record.get("device_kind"),
        paper_top1=paper.get("top1"),
        vs_paper=None if top1 is None or paper.get("top1") is None else top1 - paper["top1"],
    )


def table(workdirs: list[str], *, left_out=None) -> list[dict]:
    """One row per workdir, each with ``differs``: its config fields that differ from the
    first run's, as 'field=value'. A folder that is not a run (``NotARun``) is passed to
    ``left_out`` (a callable taking the message) and left out; without it, or when no
    folder is a run, it raises."""
    runs = []
    for workdir in workdirs:
        try:
            runs.append(read_run(workdir))
        except NotARun as e:
            if left_out is None or len(workdirs) == 1:
                raise
            left_out(str(e))
    if not runs:
        raise NotARun(f"none of {', '.join(workdirs)} is a training run (no run.json).")
    first = runs[0]["config"]
    for run in runs:
        keys = sorted(set(first) | set(run["config"]))
        run["differs"] = [
            f"{k}={run['config'].get(k)}" for k in keys if run["config"].get(k) != first.get(k)
        ]
    return runs


def _cell(value, fmt: str = "") -> str:
    return "–" if value is None else format(value, fmt)


COLUMNS = (
    ("run", lambda r: r["workdir"]),
    ("config", lambda r: " ".join([r["config_spec"] or "?", *r["overrides"]])),
    ("differs from the first", lambda r: ", ".join(r["differs"]) or "–"),
    ("params (M)", lambda r: _cell(r["params"] and r["params"] / 1e6, ".2f")),
    ("GFLOPs", lambda r: _cell(r["flops"] and r["flops"] / 1e9, ".2f")),
    ("steps", lambda r: f"{r['steps_done']}/{_cell(r['total_steps'])}"),
    ("top-1", lambda r: _cell(r["top1"], ".2f")),
    ("best top-1", lambda r: _cell(r["best_top1"], ".2f")),
    ("top-5", lambda r: _cell(r["top5"], ".2f")),
    ("best top-5", lambda r: _cell(r["best_top5"], ".2f")),
    ("img/s", lambda r: _cell(r["images_per_sec"], ".0f")),
    (
        "img/s per device",
        lambda r: " ".join(
            filter(
                None,
                [
                    _cell(r["images_per_sec_per_device"], ".0f"),
                    r["device_kind"] and f"({r['device_kind']})",
                ],
            )
        ),
    ),
    ("paper top-1", lambda r: _cell(r["paper_top1"], ".1f")),
    ("Δ paper", lambda r: _cell(r["vs_paper"], "+.2f")),
)


def markdown(runs: list[dict]) -> str:
    lines = [
        "| " + " | ".join(name for name, _ in COLUMNS) + " |",
        "| " + " | ".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + " |",
    ]
    for run in runs:
        cells = (str(cell(run)).replace("|", "\\|") for _, cell in COLUMNS)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_csv(runs: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([name for name, _ in COLUMNS])
    for run in runs:
        writer.writerow([cell(run) for _, cell in COLUMNS])
    return out.getvalue()


def to_json(runs: list[dict]) -> str:
    return json.dumps([{k: v for k, v in run.items() if k != "config"} for run in runs])
