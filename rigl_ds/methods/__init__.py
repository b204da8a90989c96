"""Method registry: the config's ``method`` string to its class. A new method is one file and one line."""

from typing import Dict, Type

from .base import DropGrowMethod, SparseMethod
from .gmp import GMPMethod
from .rigl import RigLMethod
from .set_method import SETMethod
from .snfs import SNFSMethod
from .static import StaticMethod

METHODS: Dict[str, Type[SparseMethod]] = {
    cls.name: cls for cls in (StaticMethod, SETMethod, RigLMethod, SNFSMethod, GMPMethod)
}

__all__ = [
    "METHODS",
    "SparseMethod",
    "DropGrowMethod",
    "StaticMethod",
    "SETMethod",
    "RigLMethod",
    "SNFSMethod",
    "GMPMethod",
]
