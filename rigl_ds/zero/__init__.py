"""Where each rank's slice of a masked weight lives under ZeRO stages 0-3 (views, never copies), and
everything else rigl_ds needs to know about ZeRO's tensors (``ZeroLayout``)."""

from .layout import FragmentLayout, Stage3Layout, WholeLayout, ZeroLayout, zero_layout
from .views import HpFragmentShard, Stage3Shard

__all__ = [
    "FragmentLayout",
    "HpFragmentShard",
    "Stage3Layout",
    "Stage3Shard",
    "WholeLayout",
    "ZeroLayout",
    "zero_layout",
]
