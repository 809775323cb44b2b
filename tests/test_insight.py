"""The insight tools on tiny trained runs: attention pictures and the results table."""

import json
import pathlib
import subprocess
import sys

import jax
import matplotlib.image
import numpy as np
import pytest

from sasa_flax import trainer
from sasa_flax.tools import results, visualize
from tests.helpers import model_count, tiny_config

SPEC = "tests/tiny_config.py:steps=2"
# The tools read trained runs; two tiny trainings cost ~40 s of a 2-core machine, so these
# run in the slow selection (CI runs both). The formulas, the lean weights and the scaling
# report are checked in the default run (test_report.py, test_layers.py).
needs_runs = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished 2-step runs that differ in how often they log (the same compiled
    step, so the second compiles nothing)."""
    workdirs = []
    for log_every in (1, 2):
        workdir = str(tmp_path_factory.mktemp(f"log{log_every}"))
        config = tiny_config(num_steps=2, log_every_steps=log_every)
        overrides = [f"config.train.log_every_steps={log_every}"] if log_every == 2 else []
        trainer.train_and_evaluate(
            config,
            workdir,
            devices=jax.devices()[:2],
            command=dict(config_spec=SPEC, overrides=overrides),
        )
        workdirs.append(workdir)
    return workdirs


@needs_runs
def test_results_table_reads_every_run(runs):
    table = results.table(runs)
    for run, workdir in zip(table, runs, strict=True):
        final = json.loads((pathlib.Path(workdir) / "eval_results_step_2.json").read_text())
        assert run["steps_done"] == 2 and run["total_steps"] == 2
        assert run["top1"] == final["top1"] and run["best_top1"] >= final["top1"]
        assert (run["params"], run["flops"]) == model_count(tiny_config(num_steps=2))
        assert run["images_per_sec"] > 0  # the median of the logged speeds (none: None)
        assert 0 < run["images_per_sec_per_device"] <= run["images_per_sec"]
        assert run["device_kind"] == jax.devices()[0].device_kind
    assert table[0]["differs"] == [] and table[1]["differs"] == ["train.log_every_steps=2"]
    assert table[1]["overrides"] == ["config.train.log_every_steps=2"]
    markdown = results.markdown(table)
    assert markdown.count("\n") == 3 and "log_every_steps=2" in markdown and SPEC in markdown
    assert results.to_csv(table).splitlines()[0].startswith("run,config,differs")


def test_paper_numbers_come_from_the_config_file():
    assert results.paper_numbers("configs/table4_kernel_size.py:kernel_size=9") == {"top1": 77.7}
    assert results.paper_numbers("tests/tiny_config.py") == {}
    assert results.paper_numbers("") == {}


@needs_runs
def test_report_results_and_visualize_commands(runs, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "sasa_flax.report", "--results", "--json", *runs],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = json.loads(out)
    assert [r["workdir"] for r in rows] == runs
    assert rows[1]["differs"] == ["train.log_every_steps=2"]
    missing = subprocess.run(
        [sys.executable, "-m", "sasa_flax.report", "--results", "/nonexistent/run"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1 and "is not a directory" in missing.stderr
    assert "Traceback" not in missing.stderr
    pictures = subprocess.run(
        [
            sys.executable,
            "-m",
            "sasa_flax.visualize",
            f"--config={SPEC}",
            f"--workdir={runs[0]}",
            f"--out={tmp_path}",
            "--images=1",
            "--queries=0.5,0.5",
        ],
        capture_output=True,
        text=True,
    )
    assert pictures.returncode == 0, pictures.stderr
    assert "step 2: 3 files" in pictures.stdout and (tmp_path / "index.html").exists()


@needs_runs
def test_attention_pictures_of_a_trained_run(runs, tmp_path):
    queries = [(0.5, 0.5), (0.0, 0.0)]  # the corner's window is partly outside the image
    out = visualize.visualize(
        tiny_config(num_steps=2), runs[0], str(tmp_path), images=2, queries=queries
    )
    assert out["step"] == 2 and out["layers"] == ["blocks/7/spatial"]  # attention in group 4
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(out["files"])
    assert files == [
        "blocks_7_spatial_image0.png",
        "blocks_7_spatial_image1.png",
        "blocks_7_spatial_positional.png",
        "index.html",
    ]
    index = (tmp_path / "index.html").read_text()
    assert all(f'src="{name}"' in index for name in files if name.endswith(".png"))
    for name in files[:3]:
        pixels = matplotlib.image.imread(tmp_path / name)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels[..., :3].std() > 0.05  # not blank


@needs_runs
def test_lean_weights_sum_to_one_and_vanish_outside_the_image(runs):
    config = tiny_config(num_steps=2)
    model = trainer.restore(config, runs[0], devices=jax.devices()[:1]).model()
    images = jax.numpy.zeros((1, 16, 16, 3))
    (_, layer, x), *_ = visualize.attention_inputs(model, images)
    weights, inside = layer.attention_weights(x, [(0, 0), (1, 1)])
    np.testing.assert_allclose(np.asarray(weights).sum(axis=(-2, -1)), 1.0, rtol=1e-5)
    assert np.all(np.asarray(weights)[:, 0][..., ~inside[0]] == 0)


def test_bad_queries_are_refused_in_words():
    with pytest.raises(visualize.UserError, match="--queries='0.5'"):
        visualize.parse_queries("0.5")
    assert visualize.parse_queries("0.5,0.5;0,1") == [(0.5, 0.5), (0.0, 1.0)]
