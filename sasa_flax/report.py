"""``python -m sasa_flax.report``: runs the program ``sasa_flax.tools.report`` (kept at this name,
so that the commands in the README and in earlier notes still work)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("sasa_flax.tools.report", run_name="__main__", alter_sys=True)
