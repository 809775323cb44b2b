"""What train.py and eval.py do before and around their work."""

from __future__ import annotations

import contextlib
import difflib
import os
import pathlib
import re
import sys
import traceback

from absl import app, flags, logging

from sasa_flax import logs, quiet_hooks
from sasa_flax.errors import UserError
from sasa_flax.run import distributed


def _innermost_message(error: BaseException) -> str:
    # ml_collections wraps a KeyError's "did you mean" text in an AttributeError.
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    message = str(error.args[0] if error.args else error)
    # ml_collections: "'kernal_size'\nDid you mean ...?": the key, then its hint.
    return message.strip("'\"").replace("'\n", ". ")


def _user_error_in(error: BaseException | None) -> UserError | None:
    """The first UserError a config file raised, however the flag parser re-wrapped it."""
    while error is not None:
        if isinstance(error, UserError) and "Traceback" not in str(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def _flag_machinery(filename: str) -> bool:
    """Frames of the flag parser and config loader, not of the user's code."""
    parts = ("/ml_collections/", "/absl/", "/importlib/", "<frozen ")
    return any(p in filename for p in parts) or filename == __file__


def _raised_in_user_code(error: BaseException) -> str | None:
    """If ``error`` (or an exception it wraps) was raised inside a config file or code it
    imports, not by the override parser: that traceback, from the first such frame."""
    while error is not None:
        frames = traceback.extract_tb(error.__traceback__)
        user = [frame for frame in frames if not _flag_machinery(frame.filename)]
        if user:
            where = user[-1]  # the innermost line of the user's own code
            return (
                f"{type(error).__name__} in {where.filename}, line {where.lineno}, while "
                f"loading --config: {_innermost_message(error)}\n"
                + "".join(traceback.format_list(frames[frames.index(user[0]) :])).rstrip()
            )
        error = error.__cause__ or error.__context__
    return None


def config_arguments(argv: list[str] | None = None) -> dict:
    """The ``--config`` value and the ``--config.x=y`` overrides of a command line, as
    given: what ``report --results`` shows as the run's config."""
    argv = sys.argv[1:] if argv is None else argv
    spec, overrides = "", []
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
        elif arg.startswith("--config."):
            overrides.append(arg[2:] if "=" in arg else f"{arg[2:]}={argv[i + 1]}")
    return dict(config_spec=spec, overrides=overrides)


HELP_FLAGS = ("--help", "-?", "--helpshort", "--helpfull", "--helpxml")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing where a bad config file argument or a misspelt ``--config.x=y``
    override ends with one message naming it (exit status 1), not a traceback; asking
    for help is a success (absl's help flags exit with status 1)."""
    try:
        try:
            remaining = flags.FLAGS(argv)
        except SystemExit as e:
            asked_for_help = any(a.split("=")[0] in HELP_FLAGS for a in argv[1:])
            sys.exit(0 if asked_for_help and e.code == 1 else e.code)
        if "config" in flags.FLAGS and flags.FLAGS.config is not None:
            flags.FLAGS.config.keys()  # ml_collections reports a missing file only on use
        return remaining
    except OSError as e:
        message = _missing_config_file(argv) or "cannot load --config: " + " ".join(
            line.strip() for line in str(e).splitlines()[1:] if line.strip()
        )
    except (KeyError, AttributeError) as e:
        if in_config_file := _raised_in_user_code(e):
            sys.exit(f"error: {in_config_file}")
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        message = (
            f"unknown config field in {' '.join(overrides) or 'the overrides'}: "
            f"{_innermost_message(e)} The fields are the model's arguments "
            "(sasa_flax/models) and config_lib.base_config()'s input and train sections."
        )
    except flags.Error as e:
        message = _missing_flag(e) or str(_user_error_in(e) or e)
    sys.exit(f"error: {message}\nPass --helpfull to see the flags.")


EXAMPLES = {
    "config": "--config configs/digits.py (a config file[:argument], e.g. "
    "configs/imagenet.py:depth=50; the shipped ones are in configs/)",
    "workdir": "--workdir /tmp/sasa-digits (where checkpoints, logs and results go; "
    "local or gs://bucket/path)",
}


def _missing_flag(error: flags.Error) -> str | None:
    """A required flag left out: its name and an example, instead of absl's message."""
    match = re.search(r"--(\w+) must have a value other than None", str(error))
    if match is None:
        return None
    name = match.group(1)
    return f"--{name} is required: e.g. {EXAMPLES.get(name, f'--{name}=...')}."


def _missing_config_file(argv: list[str]) -> str | None:
    """A --config path that does not exist: named, with the nearest existing config file."""
    spec = config_arguments(argv[1:])["config_spec"]
    path = pathlib.Path(spec.partition(":")[0])
    if not spec or path.is_file():
        return None
    folder = path.parent if path.parent.is_dir() else pathlib.Path("configs")
    known = sorted(str(p) for p in folder.glob("*.py")) if folder.is_dir() else []
    near = difflib.get_close_matches(str(path), known, n=1, cutoff=0.6)
    where = "there" if folder == path.parent else "shipped"
    hint = f"did you mean {near[0]}?" if near else f"config files {where}: {', '.join(known)}."
    return f"--config {spec}: no such file {str(path)!r}; {hint if known else ''}".rstrip("; ")


def run(main) -> None:
    """``app.run`` with the commands' shared --verbose flag and one-line flag errors. The
    flag is defined here, when a program runs, not when this module is imported."""
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool(
            "verbose",
            False,
            "Full tracebacks instead of one-line errors (also SASA_FLAX_VERBOSE=1).",
        )
    # Listed by --help with the program's own flags, not only under --helpfull.
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["verbose"])
    app.run(main, flags_parser=parse_flags)


def start(argv, distributed_mode: str) -> None:
    """Rejects stray arguments, joins the other hosts if any, quiets absl's INFO logging
    (orbax logs every file it writes; progress lines have their own logger)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _verbose():  # one switch for every quieting hook
        os.environ["SASA_FLAX_VERBOSE"] = "1"
    quiet_hooks.install()
    logs.show_progress(force=True)
    distributed.maybe_initialize(distributed_mode)
    logging.set_verbosity(logging.WARNING)


@contextlib.contextmanager
def user_errors():
    """A UserError ends the program with its message alone, no traceback; so does a second
    Ctrl-C (the first one stops after a checkpoint, see ``preemption``)."""
    try:
        yield
    except UserError as e:
        if _verbose():
            raise
        if getattr(e, "exit_without_waiting", False):  # e.g. saves.SaveFailed
            _exit(f"error: {e}", 1)
        sys.exit(f"error: {e}")  # a normal exit: the other hosts' shutdown waits for it
    except KeyboardInterrupt:
        print(
            "interrupted: stopped at once, without a checkpoint of the current step; the "
            "same command resumes from the newest complete checkpoint.",
            file=sys.stderr,
        )
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - any other fatal error: one line, exit 1
        if _verbose():
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        _exit(
            f"error: {type(e).__name__}: {first}\n(rerun with --verbose, or set "
            "SASA_FLAX_VERBOSE=1, for the full traceback to put in a bug report)",
            1,
        )


def _exit(message: str, status: int) -> None:
    """Prints ``message`` and ends the process now, for a fatal error that is not a
    UserError. Not ``sys.exit``: after a failed asynchronous checkpoint write (a server
    error on gs://) orbax's background commit threads wait for ever, and the interpreter
    would wait for them at exit; the newest complete checkpoint is already written, so
    there is nothing left to finish."""
    print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _verbose() -> bool:
    """SASA_FLAX_VERBOSE=1, or --verbose (which ``start`` turns into it)."""
    flag = "verbose" in flags.FLAGS and flags.FLAGS.is_parsed() and flags.FLAGS.verbose
    return bool(os.environ.get("SASA_FLAX_VERBOSE") or flag)
