"""sasa_flax as a library: pip-installable, and its layers import without the trainer's
dependencies (TensorFlow above all)."""

import ast
import pathlib
import subprocess
import sys
import venv

import pytest

from tests.helpers import ROOT

_IMPORT_LAYERS = """
import sys
import sasa_flax, sasa_flax.layers, sasa_flax.models
from sasa_flax.layers import SelfAttention2D
for heavy in ("tensorflow", "ml_collections", "orbax", "tensorflow_datasets"):
    assert heavy not in sys.modules, f"importing the layers imported {heavy}"
print("FROM", sasa_flax.__file__)
"""
_IMPORT_RUN = """
import sys
import sasa_flax.run
below = [m for m in sys.modules if m.startswith(("sasa_flax.trainer", "sasa_flax.models"))]
assert not below, f"sasa_flax.run imported the trainer or a model: {below}"
print("OK")
"""
_METADATA = 'import importlib.metadata; print("REQUIRES", importlib.metadata.requires("sasa_flax"))'


def test_the_layers_import_without_the_trainer():
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_LAYERS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr


def test_the_workdir_is_below_the_trainer():
    """The run's place (``sasa_flax.run``) imports neither the trainer nor a model: the
    dependency runs from the trainer down, never back."""
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_RUN], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_pip_install_in_a_fresh_venv(tmp_path, editable):
    # The venv sees this interpreter's packages (jax, flax: nothing is downloaded) but
    # not this checkout; pip installs the project from its pyproject.toml alone.
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    target = ["-e", str(ROOT)] if editable else [str(ROOT)]
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *target],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    # Run outside the source tree, so that the installed package is the one imported.
    out = subprocess.run(
        [python, "-c", _IMPORT_LAYERS + _METADATA],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    source = pathlib.Path(out.stdout.split("FROM ")[1].split()[0])
    assert (source.parent == ROOT / "sasa_flax") == editable
    requires = out.stdout.split("REQUIRES ")[1]
    for name in ("jax", "flax", "numpy", "tensorflow-cpu", "orbax-checkpoint"):
        assert name in requires
    assert 'extra == "train"' in requires


_IMPORT_EVERYTHING = """
import gc, logging, sys, threading, warnings
hooks = (sys.excepthook, sys.unraisablehook, threading.excepthook)
filters = [list(logging.getLogger(n).filters) for n in ("", "absl", "asyncio")]
import sasa_flax.run, sasa_flax.trainer, sasa_flax.cli, sasa_flax.quiet_hooks
assert (sys.excepthook, sys.unraisablehook, threading.excepthook) == hooks, "hooks changed"
assert [list(logging.getLogger(n).filters) for n in ("", "absl", "asyncio")] == filters
assert not any("never awaited" in str(f[1] and f[1].pattern) for f in warnings.filters)
sasa_flax.quiet_hooks.install()
assert sys.excepthook is not hooks[0] and threading.excepthook is not hooks[2]
async def _async_restore():  # as orbax's reads abandoned after a damaged checkpoint
    pass
abandoned = _async_restore()
del abandoned
gc.collect()
print("OK")
"""


_IMPORT_EVERY_MODULE = """
import importlib, pkgutil
from absl import flags
import jax, ml_collections.config_flags, orbax.checkpoint, tensorflow, tensorflow_datasets
import sasa_flax
before = set(flags.FLAGS)  # the libraries' own flags: theirs
import logging
handlers = [list(logging.getLogger(n).handlers) for n in ("", "sasa_flax")]
names = [m.name for m in pkgutil.walk_packages(sasa_flax.__path__, "sasa_flax.")]
for name in names:
    importlib.import_module(name)
assert set(flags.FLAGS) == before, sorted(set(flags.FLAGS) - before)
assert [list(logging.getLogger(n).handlers) for n in ("", "sasa_flax")] == handlers
assert logging.getLogger("sasa_flax").propagate
print(len(names), "modules", "OK")
"""


def test_every_module_imports_together_without_defining_flags_or_log_handlers():
    """A notebook or script may import report and visualize together: flags belong to the
    programs (defined in their ``__main__``), so no import defines one (two modules that
    each defined --config raised DuplicateFlagError); nor does an import install a log
    handler (the programs do: ``sasa_flax.logs``)."""
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_EVERY_MODULE], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_importing_the_library_installs_no_process_wide_hooks():
    """Hooks and log filters are the entry points' (``cli.start``), not import's; and
    TensorFlow, whoever imports it first (clu does), starts without its C++ banner."""
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_EVERYTHING], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
    assert "oneDNN" not in out.stderr and "absl::InitializeLog" not in out.stderr, out.stderr
    assert "never awaited" not in out.stderr, out.stderr


def package_imports() -> dict[str, set[str]]:
    """Every module of sasa_flax -> the package modules it imports, at the top or inside a
    function alike (``from a import b`` is module ``a.b`` where that is a module, else
    ``a``; relative imports resolved)."""
    package = ROOT / "sasa_flax"
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def known(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(known(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                imported.update(known(f"{base}.{a.name}") or known(base) for a in node.names)
        graph[name] = {m for m in imported if m and m != name}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_import_circle():
    """No module of the package imports, through any chain, a module that imports it:
    the layers below the models below the config and the trainer, the tools on top."""
    graph = package_imports()
    assert {"sasa_flax.costs", "sasa_flax.trainer.steps", "sasa_flax.tools.aot"} <= set(graph)
    assert "sasa_flax.trainer.memory" in graph["sasa_flax.tools.aot"]  # imports are resolved
    assert import_circles(graph) == []


def test_the_library_imports_no_tool():
    """The tools (sasa_flax.tools: compile reports, the TPU model, report, visualize) sit
    on top: nothing of the library imports them."""
    graph = package_imports()
    library = [m for m in graph if not m.startswith("sasa_flax.tools")]
    assert len(library) > 40
    users = {m: sorted(d for d in graph[m] if d.startswith("sasa_flax.tools")) for m in library}
    assert {m: d for m, d in users.items() if d} == {}


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_circles(graph) == [["a", "b", "c"]]
