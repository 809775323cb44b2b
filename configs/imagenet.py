r"""ImageNet SASA ResNets: the nine cells of paper Table 1.

    python train.py --config configs/imagenet.py:depth=50,variant=full_attention --workdir DIR

Arguments: depth = 26 | 38 | 50; variant = baseline (all conv) | conv_stem_attention
(ResNet conv stem, attention in all four groups) | full_attention (attention stem
too); runlocal = true for a tiny model at 64² that runs on a laptop. Any field can
be overridden, e.g. --config.model.kernel_size=9.

Paper Table 1 (GFLOPs at 224², millions of parameters, ImageNet top-1 %) is ``_TABLE1``
below, written once: `python -m sasa_flax.report --all` prints our counts beside it, and
``report --results`` a run's top-1. Top-1 is on ImageNet's validation set, where this
config evaluates.
"""

from sasa_flax import config_lib, recipes

_TABLE1 = {
    # (depth, variant): (GFLOPs, M params, top-1)
    (26, "baseline"): (4.7, 13.7, 74.5),
    (38, "baseline"): (6.5, 19.6, 76.2),
    (50, "baseline"): (8.2, 25.6, 76.9),
    (26, "conv_stem_attention"): (4.5, 10.3, 75.8),
    (38, "conv_stem_attention"): (5.7, 14.1, 77.1),
    (50, "conv_stem_attention"): (7.0, 18.0, 77.4),
    (26, "full_attention"): (4.7, 10.3, 74.8),
    (38, "full_attention"): (6.0, 14.1, 76.9),
    (50, "full_attention"): (7.2, 18.0, 77.6),
}
# Config argument -> the paper's numbers for it.
PAPER_ROWS = {
    f"depth={depth},variant={variant}": dict(gflops=gflops, mparams=mparams, top1=top1)
    for (depth, variant), (gflops, mparams, top1) in _TABLE1.items()
}


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, depth=50, variant="full_attention", runlocal=False)
    return recipes.imagenet_config(arg.depth, arg.variant, arg.runlocal)
