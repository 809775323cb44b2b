"""Tools around the library, not used by training: each a module with its own job.

  report.py        ``python -m sasa_flax.report``: parameter and FLOP counts beside the
                   paper's, the attention-vs-convolution scaling, a table over workdirs
  results.py       a sweep's workdirs read back (run records, results, TensorBoard)
  scaling.py       one layer's cost as k grows, attention vs convolution
  visualize.py     ``python -m sasa_flax.visualize``: a trained run's attention drawn
  aot.py           deviceless ahead-of-time compiles for TPU and NVIDIA GPU targets
  tpu_schedule.py  libtpu's static schedule read back: the TPU performance model

The library (layers, models, ops, the trainer) imports nothing from here.
"""
