"""Static sparsity: a fixed random mask, never updated (the paper's 'Static' baseline)."""

from .base import SparseMethod


class StaticMethod(SparseMethod):
    name = "static"
    updates_masks = False
