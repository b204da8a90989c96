"""Sparse-training methods and their registry: the config's ``method`` string to its class.

A new method is one file: a :class:`SparseMethod` subclass decorated with ``@register("name")``,
in this package (plus its import below) or in the user's own code, imported before the config is
loaded. ``METHODS`` is the live registry.
"""

from .base import DropGrowMethod, SparseMethod
from .registry import DENSE, METHODS, method_class, register

# isort: off
# Import order is registration order, which error messages list: the paper's order.
from .static import StaticMethod
from .set_method import SETMethod
from .rigl import RigLMethod
from .snfs import SNFSMethod
from .gmp import GMPMethod

# isort: on

__all__ = [
    "METHODS",
    "DENSE",
    "register",
    "method_class",
    "SparseMethod",
    "DropGrowMethod",
    "StaticMethod",
    "SETMethod",
    "RigLMethod",
    "SNFSMethod",
    "GMPMethod",
]
