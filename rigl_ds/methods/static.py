"""Static sparsity: a fixed random mask, never updated (the paper's 'Static' baseline)."""

from .base import SparseMethod
from .registry import register


@register("static")
class StaticMethod(SparseMethod):
    updates_masks = False
