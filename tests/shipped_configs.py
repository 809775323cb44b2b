"""Every shipped config spec (file:arg), for tests that must cover them all."""

import pathlib

from sasa_flax import config_lib

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def shipped_config_specs() -> list[str]:
    specs = []
    for path in sorted(CONFIG_DIR.glob("*.py")):
        module = config_lib.load_config_module(str(path))
        rows = getattr(module, "PAPER_ROWS", None)
        specs += [f"{path}:{arg}" for arg in rows] if rows else [str(path)]
    return specs
