"""FLOP formulas against XLA's cost analysis, and the report command."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sasa_flax import config_lib, costs, recipes
from sasa_flax.costs import LayerCost
from sasa_flax.layers import AttentionOptions, attention_cost
from sasa_flax.models import sasa_resnet
from sasa_flax.tools import scaling
from tests.helpers import CONFIG_DIR, model_count


@pytest.mark.slow
@pytest.mark.parametrize(
    "depth,width,size,stem", [(26, 1.0, 64, "conv"), (50, 1.0, 224, "conv"), (26, 0.5, 32, "cifar")]
)
def test_conv_flops_agree_with_xla_cost_analysis(depth, width, size, stem):
    """XLA counts a multiply-add as 2 FLOPs and skips taps on zero padding; with the
    same tap convention our conv+dense count must be XLA's minus only the elementwise
    work we do not count (BN, ReLU, additions, pooling: a few percent)."""
    config = recipes.imagenet_config(depth, "baseline")
    config.model.update(width=width, stem=stem)
    config.input.image_size = size
    model = nnx.eval_shape(lambda: config_lib.build_model(config, rngs=nnx.Rngs(0)))
    model.eval()
    graphdef, state = nnx.split(model)
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, images).compile()
    xla = compiled.cost_analysis()["flops"]
    ours = sum(
        c.flops
        for c in costs.report(
            config_lib.validate(config), config.input.image_size, in_image_taps_only=True
        )[0]
    )
    assert 1.0 <= xla / ours < 1.04
    # And the paper's convention (all taps) differs only by the border taps.
    assert 1.0 < model_count(config)[1] / ours < 1.12


def test_attention_flops_formula_by_hand():
    m = config_lib.base_config().model  # 8 heads, k = 7, relative embeddings
    names = [f.name for f in dataclasses.fields(AttentionOptions) if f.name != "impl"]
    options = sasa_resnet.attention_options(
        attention_impl=m.attention_impl, **{n: m[n] for n in names}
    )
    cost = LayerCost("a", *attention_cost(options, 64, 64, 56, 56))
    per_pixel = 3 * 64 * 64 + 49 * 64 * 2 + 49 * 64  # projections, q·k + q·r, weighted sum
    assert cost.flops == 2 * 56 * 56 * per_pixel
    assert cost.params == 3 * 64 * 64 + 7 * 8


def run_report(*args):
    return subprocess.run(
        [sys.executable, "-m", "sasa_flax.report", *args],
        capture_output=True,
        text=True,
        cwd=CONFIG_DIR.parent,
        check=False,
    )


def test_report_json_with_an_override():
    result = run_report(
        "--config", "configs/imagenet.py:depth=26", "--config.model.kernel_size=9", "--json"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    config = config_lib.load_config("configs/imagenet.py:depth=26")
    config.model.kernel_size = 9
    assert (out["params"], out["flops"]) == model_count(config)


@pytest.mark.slow  # builds all 30 shipped ImageNet models abstractly: about 30 s
def test_report_all_reproduces_table1():
    result = run_report("--all")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| `configs/")]
    assert len(rows) == 30
    table1 = [r for r in rows if "imagenet.py" in r]
    assert len(table1) == 9
    for row in table1:
        _, _, ours_p, paper_p, ours_f, paper_f, _, _ = (c.strip() for c in row.split("|"))
        assert abs(float(ours_p) - float(paper_p)) <= 0.1
        assert abs(float(ours_f) - float(paper_f)) <= 0.15


def test_report_bad_config_is_one_clear_line():
    result = run_report("--config", "configs/imagenet.py:depth=26", "--config.model.kernel_size=4")
    assert result.returncode != 0
    assert "config.model.kernel_size=4" in result.stderr
    assert "Traceback" not in result.stderr


# --- report --scaling (issue 18) ------------------------------------------------------


@pytest.mark.parametrize("convention", scaling.CONVENTIONS)
@pytest.mark.parametrize("conv_extent", [3, 5])
def test_closed_form_crossover_matches_a_brute_force_count(convention, conv_extent):
    """k* from the formula lies between the last (odd) extent at which the layers' own
    formulas (layers.attention_cost, costs.conv) make attention cheaper than the K×K
    convolution and the next one, at which it is not."""
    for width in (*scaling.WIDTHS, 96, 1000):
        conv_macs = scaling.conv_per_pixel(width, conv_extent)[1]
        cheaper = [
            k
            for k in range(1, 201, 2)
            if scaling.attention_per_pixel(width, k, convention)[1] < conv_macs
        ]
        k_star = scaling.crossover(width, convention, conv_extent)
        assert cheaper == list(range(1, cheaper[-1] + 1, 2))  # cost grows with k
        assert cheaper[-1] <= k_star <= cheaper[-1] + 2, (width, k_star, cheaper[-1])


def test_factored_and_per_neighbour_counts_differ_by_the_relative_term_only():
    for width, k in [(64, 3), (128, 19), (512, 31)]:
        per = scaling.attention_per_pixel(width, k, "per_neighbour")[1]
        factored = scaling.attention_per_pixel(width, k, "factored")[1]
        assert per - factored == (k * k - k) * width
        assert per == 3 * width * width + 3 * k * k * width  # the docstring's formula
        assert scaling.conv_per_pixel(width, k) == (k * k * width * width,) * 2


def test_report_scaling_prints_json_and_draws_the_plot(tmp_path):
    png = tmp_path / "scaling.png"
    out = subprocess.run(
        [sys.executable, "-m", "sasa_flax.report", "--scaling", "--json", f"--plot={png}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(out)
    k_star = {(c["width"], c["convention"]): c["k_star"] for c in result["crossovers"]}
    assert k_star[(128, "per_neighbour")] == pytest.approx(16.0)
    assert k_star[(128, "factored")] == pytest.approx(19.35, abs=0.01)
    assert len(result["rows"]) == len(scaling.WIDTHS) * len(scaling.EXTENTS)
    assert "k = 19" in result["paper_k19"]
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] > 400 and pixels.shape[1] > 600 and pixels.std() > 0.05


def test_a_folder_that_is_not_a_run_is_one_line_not_a_row_of_differences(tmp_path):
    """``report --results`` on a folder without run.json: one line saying so (it used to
    be a row whose 'differs' listed every config field as None)."""
    import json

    from sasa_flax.tools import results

    (tmp_path / "empty").mkdir()
    (tmp_path / "run").mkdir()
    config = dict(model=dict(depth=26), input=dict(dataset="digits"), train=dict(seed=0))
    (tmp_path / "run" / "run.json").write_text(json.dumps(dict(config=config)))
    with pytest.raises(results.NotARun, match=r"empty has no run\.json: not a training run"):
        results.table([str(tmp_path / "empty")])
    said = []
    runs = results.table([str(tmp_path / "empty"), str(tmp_path / "run")], left_out=said.append)
    assert [r["workdir"] for r in runs] == [str(tmp_path / "run")] and runs[0]["differs"] == []
    assert len(said) == 1 and "empty has no run.json" in said[0]
