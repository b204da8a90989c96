"""Where each rank's slice of a masked weight lives under ZeRO stages 0-3 (views, never copies)."""

from .views import HpFragmentShard, Stage3Shard, zero_shards

__all__ = ["HpFragmentShard", "Stage3Shard", "zero_shards"]
