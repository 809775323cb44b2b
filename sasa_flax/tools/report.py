r"""Parameter and FLOP report of a config's model, checkable against the paper.

    python -m sasa_flax.report --config configs/imagenet.py:depth=50,variant=full_attention
    python -m sasa_flax.report --config configs/imagenet.py:depth=26 \
        --config.model.kernel_size=9 --json
    python -m sasa_flax.report --config configs/cifar10.py --layers
    python -m sasa_flax.report --all        # every shipped ImageNet config beside the paper
    python -m sasa_flax.report --scaling [--plot cost.png] [--json]   # attention vs conv
    python -m sasa_flax.report --results WORKDIR [WORKDIR ...] [--json | --csv]  # a sweep

Counts are analytic (``sasa_flax.costs``: the convention and where each formula lives), at
the config's input size, a multiply-add counted as 2 FLOPs; nothing is built or compiled.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from sasa_flax import cli, config_lib, costs
from sasa_flax.errors import UserError
from sasa_flax.tools import results, scaling

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"


def summary(config) -> dict:
    layers, uncounted = costs.report(config_lib.validate(config), config.input.image_size)
    params, total_flops = costs.total(layers)
    return {
        "params": params,
        "flops": total_flops,
        "image_size": config.input.image_size,
        "num_classes": config.model.get("num_classes"),
        "convention": "multiply-add = 2 FLOPs; BN, ReLU, softmax and pooling not counted",
        "layers": [dataclasses.asdict(layer) for layer in layers],
        # Layers with parameters that no cost rule counts: the totals leave them out.
        "uncounted_layers": uncounted,
    }


def shipped_imagenet_rows() -> list[tuple[str, dict, dict]]:
    """(config spec, our summary, the paper's numbers) for every shipped ImageNet config."""
    rows = []
    for path in sorted(CONFIG_DIR.glob("*.py")):
        module = config_lib.load_config_module(str(path))
        for arg, paper in getattr(module, "PAPER_ROWS", {}).items():
            config = module.get_config(arg)
            if config.input.dataset != "imagenet2012":
                continue
            rows.append((f"configs/{path.name}:{arg}", summary(config), paper))
    return rows


def markdown_table(rows) -> str:
    def cell(value, fmt):
        return "–" if value is None else format(value, fmt)

    lines = [
        "| config | params (M) | paper | FLOPs (B) | paper | paper top-1 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for spec, ours, paper in rows:
        lines.append(
            f"| `{spec}` | {ours['params'] / 1e6:.2f} | {cell(paper.get('mparams'), '.1f')} "
            f"| {ours['flops'] / 1e9:.2f} | {cell(paper.get('gflops'), '.1f')} "
            f"| {cell(paper.get('top1'), '.1f')} |"
        )
    return "\n".join(lines)


def main(argv):
    if _RESULTS.value:
        if len(argv) < 2:
            raise app.UsageError("--results needs one or more training workdirs.")
        with cli.user_errors():
            try:
                runs = results.table(
                    argv[1:], left_out=lambda why: print(f"left out: {why}", file=sys.stderr)
                )
            except FileNotFoundError as e:
                raise UserError(str(e)) from None
        formats = {True: results.to_json, False: results.markdown}
        print(results.to_csv(runs) if _CSV.value else formats[_JSON.value](runs))
        return
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _ALL.value:
        print(markdown_table(shipped_imagenet_rows()))
        return
    if _SCALING.value:
        result = scaling.summary()
        if _PLOT.value:
            scaling.plot(result, _PLOT.value)
        print(json.dumps(result) if _JSON.value else scaling.markdown(result))
        return
    if _PLOT.value:
        raise app.UsageError("--plot draws the --scaling report; pass --scaling too.")
    if _CONFIG.value is None:
        raise app.UsageError("pass --config path/to/config.py[:arg], --all or --scaling.")
    with cli.user_errors():
        result = summary(_CONFIG.value)
    if _JSON.value:
        print(json.dumps({k: v for k, v in result.items() if k != "layers" or _LAYERS.value}))
        return
    size = result["image_size"]
    print(f"parameters: {result['params']:,} ({result['params'] / 1e6:.2f} M)")
    print(
        f"FLOPs:      {result['flops']:,} ({result['flops'] / 1e9:.2f} B) at {size}×{size}, "
        f"{result['num_classes']} classes ({result['convention']})"
    )
    if result["uncounted_layers"]:
        print(
            "NOT COUNTED (parameters, but no cost rule in sasa_flax.costs; the totals leave "
            f"them out): {', '.join(result['uncounted_layers'])}"
        )
    if _LAYERS.value:
        print("\n| layer | params | MFLOPs |\n| --- | ---: | ---: |")
        for layer in result["layers"]:
            print(f"| {layer['name']} | {layer['params']:,} | {layer['flops'] / 1e6:.1f} |")


if __name__ == "__main__":
    # The program's flags, defined when it runs, not when the module is imported (report
    # and visualize in one process would define --config twice).
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Config file[:arg].", lock_config=True
    )
    _JSON = flags.DEFINE_bool("json", False, "Print one JSON object on stdout.")
    _ALL = flags.DEFINE_bool("all", False, "Markdown table of every shipped ImageNet config.")
    _LAYERS = flags.DEFINE_bool("layers", False, "Also list every counted layer.")
    _SCALING = flags.DEFINE_bool(
        "scaling", False, "One layer's cost, attention vs convolution, as k grows (C = 64..512)."
    )
    _RESULTS = flags.DEFINE_bool(
        "results", False, "One table over the training workdirs given as arguments."
    )
    _CSV = flags.DEFINE_bool("csv", False, "With --results: CSV instead of markdown.")
    _PLOT = flags.DEFINE_string("plot", None, "With --scaling: also draw it into this PNG file.")
    app.run(main)
