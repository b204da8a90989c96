"""Exact top-k over shards with torch.distributed collectives (never gathering a tensor)."""

from .collectives import ShardedCollectives
from .radix import order_keys, radix_select_topk

__all__ = ["ShardedCollectives", "order_keys", "radix_select_topk"]
