r"""Pictures of what a trained model's attention layers do.

    python -m sasa_flax.visualize --config configs/digits.py --workdir /tmp/sasa-digits \
        --out /tmp/sasa-digits/pictures
    python -m sasa_flax.visualize ... --images 2 --queries "0.5,0.5;0,0" --step 400

From a checkpoint (the EMA weights where the run kept them; the newest that verifies,
or ``--step``), for the first ``--images`` evaluation images, it writes into ``--out``:

  - ``<layer>_image<i>.png`` for every ``SelfAttention2D``: one row per query pixel
    (``--queries``: fractions of the layer's height and width), one panel per head: the
    image at the layer's resolution, the query's k×k window coloured by its softmax
    weights, neighbours outside the image (masked, ``padding="mask"``) hatched grey;
  - ``<layer>_positional.png``: per head, the k×k logits of the learned relative row and
    column embeddings for a unit query (the head's mean query direction over the
    images), i.e. which offsets the head prefers before content;
  - ``index.html``, showing them all on one page.

The weights come from ``SelfAttention2D.attention_weights``, which computes only the
chosen pixels' windows (no whole-image patches), so it works for any ``impl`` and size.
"""

from __future__ import annotations

import html
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from sasa_flax import cli, data, trainer
from sasa_flax.errors import UserError
from sasa_flax.layers import SelfAttention2D
from sasa_flax.ops import patches


def parse_queries(text: str) -> list[tuple[float, float]]:
    try:
        queries = [tuple(float(v) for v in q.split(",")) for q in text.split(";") if q.strip()]
    except ValueError:
        queries = []
    if not queries or any(len(q) != 2 or not all(0 <= v <= 1 for v in q) for q in queries):
        raise UserError(
            f"--queries={text!r}: give row,col fractions in [0, 1] separated by ';', "
            "e.g. '0.5,0.5;0,0'."
        )
    return queries


def attention_inputs(
    model: nnx.Module, images: jax.Array
) -> list[tuple[str, SelfAttention2D, jax.Array]]:
    """(path, layer, its input) of every SelfAttention2D in ``model`` on ``images``, from
    one eager forward pass (each layer's call is recorded on the way)."""
    paths = {
        id(module): "/".join(str(p) for p in path)
        for path, module in nnx.iter_graph(model)
        if isinstance(module, SelfAttention2D)
    }
    seen = []
    original = SelfAttention2D.__call__

    def recording(self, x):
        seen.append((paths.get(id(self), "attention"), self, x))
        return original(self, x)

    SelfAttention2D.__call__ = recording
    try:
        model(images)
    finally:
        SelfAttention2D.__call__ = original
    return seen


def positional_logits(layer: SelfAttention2D, x: jax.Array) -> np.ndarray | None:
    """(N, k, k): q̂·[rel_row[a]; rel_col[b]] for each head's unit mean query q̂."""
    if layer.rel_row is None:
        return None
    q, _, _ = layer._qkv(x)  # (B, H, W, N, d)
    mean = jnp.mean(q.astype(jnp.float32), axis=(0, 1, 2))  # (N, d)
    unit = mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
    rows, cols = layer.rel_row[...].astype(jnp.float32), layer.rel_col[...].astype(jnp.float32)
    return np.asarray(patches.relative_logits(unit, rows, cols))


def _layer_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The (S, S, 3) uint8 image at a layer's resolution, as grey levels in [0, 1]."""
    grey = image.astype(np.float32).mean(-1, keepdims=True) / 255.0
    return np.asarray(jax.image.resize(grey, (height, width, 1), "linear"))[..., 0]


def draw_weights(path, image, weights, inside, positions, kernel_size, title):
    """One PNG: rows = query pixels, columns = heads. weights (P, N, k, k), inside (P, k, k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    height, width = image.shape
    r = kernel_size // 2
    n_queries, heads = weights.shape[:2]
    fig, axes = plt.subplots(
        n_queries, heads, figsize=(1.9 * heads + 0.6, 1.9 * n_queries + 0.5), squeeze=False
    )
    for p, (i, j) in enumerate(positions):
        for n in range(heads):
            ax = axes[p, n]
            canvas = np.full((height + 2 * r, width + 2 * r), np.nan)
            canvas[r : r + height, r : r + width] = image
            ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            overlay = np.full_like(canvas, np.nan)
            window = np.where(inside[p], weights[p, n], np.nan)
            overlay[i : i + kernel_size, j : j + kernel_size] = window
            ax.imshow(
                overlay,
                cmap="magma",
                vmin=0,
                vmax=max(float(np.nanmax(window)), 1e-6),
                alpha=0.85,
                interpolation="nearest",
            )
            for y, x in zip(*np.nonzero(~inside[p]), strict=True):  # masked: outside the image
                ax.add_patch(
                    Rectangle(
                        (j + x - 0.5, i + y - 0.5),
                        1,
                        1,
                        facecolor="0.75",
                        edgecolor="0.4",
                        hatch="xx",
                        linewidth=0.3,
                    )
                )
            ax.add_patch(
                Rectangle(
                    (j + r - 0.5, i + r - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=1.2
                )
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if p == 0:
                ax.set_title(f"head {n}", fontsize=8)
            if n == 0:
                ax.set_ylabel(f"query ({i}, {j})", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def draw_positional(path, logits, title):
    """One PNG: per head, the k×k positional logits (row offset down, column across)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads, k, _ = logits.shape
    bound = max(float(np.abs(logits).max()), 1e-6)
    fig, axes = plt.subplots(1, heads, figsize=(1.9 * heads + 0.8, 2.3), squeeze=False)
    ticks = [0, k // 2, k - 1]
    for n in range(heads):
        ax = axes[0, n]
        im = ax.imshow(logits[n], cmap="RdBu_r", vmin=-bound, vmax=bound)
        ax.set_xticks(ticks, [str(t - k // 2) for t in ticks], fontsize=7)
        ax.set_yticks(ticks, [str(t - k // 2) for t in ticks], fontsize=7)
        ax.set_title(f"head {n}", fontsize=8)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="logit")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _file_name(layer_path: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", layer_path).strip("_") or "attention"


def visualize(
    config, workdir: str, out: str, *, step=None, images: int = 2, queries=((0.5, 0.5), (0.0, 0.0))
) -> dict:
    """Writes the pictures and index.html; returns {"step", "files": [...], "layers": [...]}."""
    # The evaluation split only, in the run's own evaluation setting (trainer.restore).
    restored = trainer.restore(
        config, workdir, step=step, devices=jax.devices()[:1], process_index=0, process_count=1
    )
    step, model = restored.step, restored.model()
    batch = next(data.eval_batches(restored.setup.dataset, config.input))
    pixels = batch["image"][: max(1, images)]
    recorded = attention_inputs(model, data.normalise(jnp.asarray(pixels)))
    if not recorded:
        raise UserError(f"the model of {config.model.name} has no SelfAttention2D layer to draw.")
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, sections = [], []
    for layer_path, layer, x in recorded:
        _, height, width, _ = x.shape
        positions = sorted({(round(a * (height - 1)), round(b * (width - 1))) for a, b in queries})
        weights, inside = layer.attention_weights(x, positions)
        weights = np.asarray(weights, np.float32)
        name = _file_name(layer_path)
        shown = []
        logits = positional_logits(layer, x)
        if logits is not None:
            png = out_dir / f"{name}_positional.png"
            draw_positional(png, logits, f"{layer_path}: positional logits, unit query")
            shown.append(png.name)
        for i in range(len(pixels)):
            png = out_dir / f"{name}_image{i}.png"
            draw_weights(
                png,
                _layer_image(pixels[i], height, width),
                weights[i],
                inside,
                positions,
                layer.options.kernel_size,
                f"{layer_path} ({height}×{width}, k={layer.options.kernel_size})\neval image {i}, "
                f"step {step}; hatched: outside the image",
            )
            shown.append(png.name)
        files += shown
        sections.append((layer_path, height, width, shown))
    index = out_dir / "index.html"
    index.write_text(_index_html(workdir, step, sections))
    return dict(step=step, files=[*files, index.name], layers=[s[0] for s in sections])


def _index_html(workdir, step, sections) -> str:
    body = [
        f"<h1>Attention of {html.escape(str(workdir))}, step {step}</h1>",
        "<p>Each panel: the image at the layer's resolution; the query pixel (cyan) and "
        "its window coloured by softmax weight; hatched cells are outside the image "
        "(masked).</p>",
    ]
    for layer_path, height, width, files in sections:
        body.append(f"<h2>{html.escape(layer_path)} ({height}×{width})</h2>")
        body += [f'<img src="{html.escape(f)}" style="max-width:100%"><br>' for f in files]
    return "<!doctype html><meta charset='utf-8'><title>sasa_flax attention</title>\n" + "\n".join(
        body
    )


def main(argv):
    cli.start(argv, "off")
    with cli.user_errors():
        if _CONFIG.value is None or not _WORKDIR.value or not _OUT.value:
            raise UserError("pass --config, --workdir (a trained run) and --out (a directory).")
        result = visualize(
            _CONFIG.value,
            _WORKDIR.value,
            _OUT.value,
            step=_STEP.value,
            images=_IMAGES.value,
            queries=parse_queries(_QUERIES.value),
        )
    print(f"step {result['step']}: {len(result['files'])} files in {_OUT.value} (index.html)")


if __name__ == "__main__":
    # The program's flags, defined when it runs, not when the module is imported (report
    # and visualize in one process would define --config twice).
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Config file[:arg].", lock_config=True
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
    _OUT = flags.DEFINE_string("out", None, "Directory for the PNGs and index.html.")
    _STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest good one).")
    _IMAGES = flags.DEFINE_integer("images", 2, "Evaluation images to draw.")
    _QUERIES = flags.DEFINE_string(
        "queries", "0.5,0.5;0,0;0.25,0.75", "Query pixels as row,col fractions, ';'-separated."
    )
    cli.run(main)
