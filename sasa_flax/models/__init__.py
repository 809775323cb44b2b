"""Models by name (``registry``) and the built-in SASA ResNets (``resnet``; registered
as "sasa_resnet" by ``sasa_resnet``)."""

from sasa_flax.models import resnet, sasa_resnet  # sasa_resnet registers "sasa_resnet"
from sasa_flax.models.registry import (
    arguments,
    build,
    get,
    implementation_fields,
    names,
    register,
)
from sasa_flax.models.resnet import ResNet, block_specs

__all__ = [
    "ResNet",
    "arguments",
    "block_specs",
    "build",
    "get",
    "implementation_fields",
    "names",
    "register",
    "resnet",
    "sasa_resnet",
]
