"""The README and docs/ stay true: every relative link resolves, and every command they
show still parses: its script or module exists, every flag it passes is one that entry
point defines, and its ``--config`` (with the overrides) loads and validates. Commands
are read from the ``bash`` blocks, the ones inside ``gcloud ... --command="..."`` too."""

import ast
import importlib.util
import pathlib
import re
import shlex

import pytest
from absl import flags
from ml_collections import config_flags

from sasa_flax import config_lib
from tests.helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_BASH = re.compile(r"```bash\n(.*?)```", re.S)
_COMMAND = re.compile(r"python (?:-m [\w.]+|[\w/]+\.py)[^\"&;|#\n]*")
_LOOP = re.compile(r"for (\w+) in (\S+)")
# absl's own flags, and those every entry point gets from sasa_flax.cli
_COMMON_FLAGS = {"help", "helpfull", "helpshort", "verbose"}


def _relative_links(page):
    for target in _LINK.findall(page.read_text()):
        if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
            yield target.split("#")[0]


def _commands():
    """(page, command tokens) of every python command the pages show; a shell loop's
    variable is given the loop's first value."""
    for page in PAGES:
        for block in _BASH.findall(page.read_text()):
            block = block.replace("\\\n", " ")
            values = {name: first for name, first in _LOOP.findall(block)}
            for line in block.splitlines():
                for command in _COMMAND.findall(line):
                    for name, value in values.items():
                        command = command.replace(f"${name}", value)
                    yield page, shlex.split(command)


COMMANDS = list(_commands())


def _entry_point_source(tokens):
    if tokens[1] == "-m":
        spec = importlib.util.find_spec(tokens[2])
        assert spec is not None and spec.origin, f"no module {tokens[2]}"
        # A program kept at an old name runs its new module (sasa_flax/report.py).
        if moved := re.search(r'run_module\("([\w.]+)"', pathlib.Path(spec.origin).read_text()):
            spec = importlib.util.find_spec(moved.group(1))
        return spec.origin, tokens[3:]
    path = ROOT / tokens[1]
    assert path.is_file(), f"no script {tokens[1]}"
    return str(path), tokens[2:]


def _defined_flags(source_file) -> set[str]:
    """The absl flags (``DEFINE_*("name", ...)``) and argparse options a file defines."""
    names = set()
    for node in ast.walk(ast.parse(pathlib.Path(source_file).read_text())):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = (
            node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        )
        first = node.args[0]
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            continue
        if func.startswith("DEFINE_"):
            names.add(first.value)
        elif func == "add_argument" and first.value.startswith("--"):
            names.add(first.value[2:])
    return names


def _config(arguments):
    """The config a command line's ``--config`` and ``--config.x=y`` give, as absl
    parses them for the entry points."""
    argv = ["prog"] + [
        f"{a}={arguments[i + 1]}" if a == "--config" else a
        for i, a in enumerate(arguments)
        if a.startswith("--config")
    ]
    values = flags.FlagValues()  # the overrides are read from sys_argv, as from sys.argv
    config_flags.DEFINE_config_file("config", None, "", values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


def test_the_readme_is_short_and_every_relative_link_resolves():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    for page in PAGES:
        for target in _relative_links(page):
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
    linked = {(ROOT / t).resolve() for t in _relative_links(ROOT / "README.md")}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


_REPO_PATH = re.compile(r"(?<![\w/.])((?:sasa_flax|tests|benchmarks|configs|docs)/[\w/.-]*\w)")


def test_every_file_or_folder_the_pages_name_exists():
    """A path the README or a docs page names (``sasa_flax/data/``, ``configs/digits.py``)
    is there: a module that moves takes its mentions with it."""
    for page in PAGES:
        missing = sorted(
            {m for m in _REPO_PATH.findall(page.read_text()) if not (ROOT / m).exists()}
        )
        assert not missing, f"{page.name} names paths that do not exist: {missing}"


def test_the_pages_show_the_commands_a_user_needs():
    shown = {" ".join(tokens[:3]) for _, tokens in COMMANDS}
    for needed in ("python train.py --config", "python eval.py --config", "python -m pytest"):
        assert any(s.startswith(needed) for s in shown), needed


@pytest.mark.parametrize(
    "page, tokens", COMMANDS, ids=[f"{p.name}:{' '.join(t[:4])}" for p, t in COMMANDS]
)
def test_every_command_shown_parses(page, tokens):
    if tokens[1:3] == ["-m", "pytest"]:
        registered = (ROOT / "tests" / "conftest.py").read_text()  # addinivalue_line
        for i, token in enumerate(tokens):
            if token == "-m" and i > 2:
                assert f'"{tokens[i + 1]}:' in registered, f"unknown marker {tokens[i + 1]}"
        return
    source, arguments = _entry_point_source(tokens)
    defined = _defined_flags(source) | _COMMON_FLAGS
    for argument in arguments:
        name = argument[2:].split("=")[0]
        if argument.startswith("--") and not name.startswith("config."):
            assert name in defined, f"{page.name}: {source} has no flag --{name}"
    if any(a.startswith("--config") for a in arguments):
        config_lib.validate(_config(arguments))
