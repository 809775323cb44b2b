"""Shared config pieces, config validation, and the model built from a config.

A config is a Python file with ``get_config(arg=None)`` returning an
``ml_collections.ConfigDict``; ``arg`` is the string after the colon in
``--config configs/imagenet.py:depth=50,variant=full_attention``.

``config.model.name`` names a registered model (``sasa_flax.models``; default
``"sasa_resnet"``) and the other fields of ``config.model`` are its keyword arguments.
Two verbs: ``validate(config)`` checks every field (the model's by building it abstractly:
nothing is computed or compiled; its ``ArgumentError`` is reported as the config field's),
and ``build_model(config, rngs=...)`` builds the model. What is not about the model
(input, training) is checked here.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import pathlib
from typing import Any

import ml_collections
from flax import nnx

from sasa_flax import models
from sasa_flax.errors import ArgumentError, UserError

DEFAULT_MODEL = "sasa_resnet"


class ConfigError(UserError):
    """A config field holds a value that cannot work; the message names the field."""


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses ``"depth=50,variant=full_attention"`` against typed defaults.

    Each value is converted to the type of its default (bool accepts
    true/false/1/0/yes/no). A key without a default is an error listing the known ones.
    """
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ConfigError(
                f"unknown config argument {key!r} in {arg!r}; "
                + (
                    f"known arguments: {', '.join(sorted(defaults))}."
                    if defaults
                    else "this config takes no arguments (override fields with --config.x=y)."
                )
            )
        if not sep:
            raise ConfigError(f"config argument {item!r} needs a value: write {key}=VALUE.")
        values[key] = _convert(key, raw.strip(), defaults[key])
    return ml_collections.ConfigDict(values)


def _convert(key: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        lowered = raw.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"config argument {key}={raw!r} must be true or false.")
    try:
        return type(default)(raw) if default is not None else raw
    except ValueError:
        raise ConfigError(
            f"config argument {key}={raw!r} must be a {type(default).__name__}."
        ) from None


def model_config(name: str, **fields: Any) -> ml_collections.ConfigDict:
    """``config.model`` for registered model ``name``: every argument at its default,
    then ``fields``."""
    config = ml_collections.ConfigDict(dict(name=name, **models.arguments(name)))
    config.update(fields)
    return config


def base_config() -> ml_collections.ConfigDict:
    """Every field a config has, at ImageNet / paper defaults (the SASA ResNet's model
    fields; ``config.model = model_config("other")`` switches model)."""
    config = ml_collections.ConfigDict()
    config.model = model_config(DEFAULT_MODEL)
    config.input = ml_collections.ConfigDict(
        dict(
            # "digits" (offline), "folder" (class subfolders under data_dir), or any TFDS
            # image-classification name: imagenet2012, cifar10, cifar100, imagenette, ...
            dataset="imagenet2012",
            data_dir="",  # TFDS data_dir (may be gs://...), or the folder for "folder"
            manual_dir="",  # ImageNet's manual-download directory, to build it once
            image_size=224,
            batch_size=4096,  # global, over all devices and processes
            eval_batch_size=1024,
            # "inception": random-area crop + resize (ImageNet); "pad": pad 4 + random crop
            augment="inception",
            random_flip=True,
            # Evaluate on the held-out 4% of the training split (the paper's tuning split,
            # Tables 3 and 5) and train on the other 96%.
            tuning_split=False,
            shuffle_buffer=16384,
            # An image that cannot be decoded: "fail" stops with its error; "skip" gives it
            # zero weight (train) or leaves it out of the count (eval), and counts it.
            corrupt_images="fail",
        )
    )
    config.train = ml_collections.ConfigDict(
        dict(
            num_epochs=130.0,
            num_steps=0,  # if > 0, overrides num_epochs
            warmup_epochs=10.0,
            # Nesterov SGD, lr = base_learning_rate × global batch / 256 (paper A.2: 1.6 at 4096)
            base_learning_rate=0.1,
            momentum=0.9,
            nesterov=True,
            weight_decay=1e-4,  # on convolution / projection kernels only
            label_smoothing=0.0,
            ema_decay=0.9999,  # parameter EMA used for evaluation; 0 disables it
            # Effective EMA decay min(ema_decay, (1 + t) / (10 + t)) at step t, so that the
            # average forgets its random start within a short run (False: ema_decay always).
            ema_warmup=True,
            # A resumed run whose schedule or data fields differ from its checkpoint's is
            # refused; True resumes with the new schedule from the checkpoint's step (how a
            # finished run is extended).
            allow_schedule_change=False,
            compute_dtype="auto",  # bfloat16 on TPU/GPU, float32 on CPU
            # Gradient accumulation: each optimizer step runs input.batch_size images through
            # the model in this many micro-batches, one after another in one compiled step,
            # and applies their mean gradient: the recipe's batch on fewer chips, the
            # activations' memory of a micro-batch. BatchNorm statistics are per micro-batch.
            accumulation_steps=1,
            seed=0,
            # A jax.profiler trace of this many steps (0: none, and no cost) after step
            # profile_start_step, into <workdir>/profile (TensorBoard's profile tab, xprof).
            profile_steps=0,
            profile_start_step=10,
            log_every_steps=100,
            eval_every_steps=0,  # 0: evaluate at the end only
            checkpoint_every_steps=1000,
            keep_checkpoints=3,
            # A non-finite loss or gradient: "stop" ends the run naming the step (the last
            # good checkpoint stays the newest); "skip" leaves the state as it was and counts it.
            on_nonfinite="stop",
        )
    )
    return config


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``"path/to/config.py:arg"`` as ``--config`` does, and validates it."""
    path, _, arg = spec.partition(":")
    config = load_config_module(path).get_config(arg or None)
    validate(config)
    return config


def load_config_module(path: str):
    """Imports a config file by path (config files are not a package)."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} does not exist.")
    spec = importlib.util.spec_from_file_location(f"sasa_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _field_error(field: str, value: Any, requirement: str) -> ConfigError:
    return ConfigError(f"config.{field}={value!r}: {requirement}")


def _one_of(config, field: str, choices) -> None:
    section, name = field.split(".")
    value = config[section][name]
    if value not in choices:
        raise _field_error(field, value, f"must be one of {tuple(choices)}.")


def _unknown_fields(section: str, given, known) -> ConfigError | None:
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return None
    hints = [
        f"{name!r} (did you mean {match[0]!r}?)" if match else repr(name)
        for name in unknown
        for match in [difflib.get_close_matches(name, list(known), n=1)]
    ]
    return ConfigError(
        f"config.{section} has unknown field(s) {unknown}: {', '.join(hints)}; known "
        f"fields: {', '.join(sorted(known))}."
    )


def model_fields(config: ml_collections.ConfigDict) -> tuple[str, dict[str, Any]]:
    """(model name, keyword arguments) from ``config.model``."""
    fields = config.model.to_dict()
    return fields.pop("name", DEFAULT_MODEL), fields


def validate(config: ml_collections.ConfigDict, dtype: Any = None):
    """Checks every field; raises ConfigError naming the field and the fix. The one check
    of a config: ``load_config``, the entry points and the trainer's setup call it.

    The input and training fields are checked here; the model's by building it
    abstractly (its constructor checks its own arguments) and asking it about the image
    size. Returns that abstract model (``build_model`` without rngs, in ``dtype``), so that
    a caller that needs it does not build it twice.
    """
    known = base_config()
    for section in ("model", "input", "train"):
        if section not in config:
            raise ConfigError(f"config.{section} is missing; start from config_lib.base_config().")
    for section in ("input", "train"):
        if error := _unknown_fields(section, config[section].keys(), known[section].keys()):
            raise error
    name, fields = model_fields(config)
    try:
        known_model = models.arguments(name)
    except ArgumentError as e:
        raise ConfigError(e.as_field("config.model.")) from None
    if error := _unknown_fields("model", fields, known_model):
        raise error
    size = config.input.image_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise _field_error("input.image_size", size, "must be a positive integer (pixels).")
    model = build_model(config, dtype=dtype)
    if hasattr(model, "check_image_size"):
        try:
            model.check_image_size(size, size)
        except ArgumentError as e:
            raise ConfigError(e.as_field("config.input.")) from None
    _validate_input_and_train(config)
    return model


def build_model(
    config: ml_collections.ConfigDict, *, rngs: nnx.Rngs | None = None, dtype: Any = None
):
    """The config's model, in compute ``dtype`` (None: the parameters' float32). Without
    ``rngs`` it is abstract (``nnx.eval_shape``: shapes only, nothing computed). Does not
    check the config (``validate`` does, once); an ``ArgumentError`` of the model's
    constructor is reported as the config field's."""
    name, fields = model_fields(config)
    build = functools.partial(models.build, name, fields, dtype=dtype)
    try:
        if rngs is None:
            return nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0)))
        return build(rngs=rngs)
    except ArgumentError as e:
        raise ConfigError(e.as_field("config.model.")) from None


def _positive(config, field: str, kind=(int, float), allow_zero: bool = False) -> None:
    section, name = field.split(".")
    value = config[section][name]
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise _field_error(field, value, f"must be a {bound} number.")


def _validate_input_and_train(config) -> None:
    i, t = config.input, config.train
    if not isinstance(i.dataset, str) or not i.dataset:
        raise _field_error("input.dataset", i.dataset, "must name a dataset, e.g. 'imagenet2012'.")
    if i.dataset == "folder" and not i.data_dir:
        raise ConfigError(
            "config.input.dataset='folder' needs config.input.data_dir: a directory with one "
            "subfolder of images per class."
        )
    if not isinstance(i.augment, str) or not i.augment:
        raise _field_error("input.augment", i.augment, "must name an augmentation, e.g. 'pad'.")
    if i.augment == "pad" and isinstance(i.image_size, int) and i.image_size <= 4:
        raise _field_error(
            "input.image_size",
            i.image_size,
            "must be more than 4 with config.input.augment='pad' (it reflect-pads by 4 pixels).",
        )
    _one_of(config, "input.corrupt_images", ("fail", "skip"))
    _one_of(config, "train.on_nonfinite", ("stop", "skip"))
    for field in ("input.batch_size", "input.eval_batch_size", "input.shuffle_buffer"):
        _positive(config, field, kind=int)
    for field in (
        "train.momentum",
        "train.weight_decay",
        "train.label_smoothing",
        "train.ema_decay",
        "train.warmup_epochs",
        "train.num_steps",
        "train.eval_every_steps",
    ):
        _positive(config, field, allow_zero=True)
    for field in (
        "train.base_learning_rate",
        "train.log_every_steps",
        "train.checkpoint_every_steps",
        "train.keep_checkpoints",
    ):
        _positive(config, field)
    _positive(config, "train.accumulation_steps", kind=int)
    for field in ("train.profile_steps", "train.profile_start_step"):
        _positive(config, field, kind=int, allow_zero=True)
    if t.num_steps == 0:
        _positive(config, "train.num_epochs")
    if not 0.0 <= t.ema_decay < 1.0:
        raise _field_error("train.ema_decay", t.ema_decay, "must be in [0, 1); 0 disables the EMA.")
    if not 0.0 <= t.label_smoothing < 1.0:
        raise _field_error("train.label_smoothing", t.label_smoothing, "must be in [0, 1).")
    _one_of(config, "train.compute_dtype", ("auto", "float32", "bfloat16"))
