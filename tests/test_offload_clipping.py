"""Gradient clipping sees the sparse model's gradient norm with the optimizer offloaded too.

Offloaded ZeRO takes each parameter's gradient norm during backward, before the masks apply; without
offload it takes the norm in the step, of the masked gradients. Both must clip by the same norm.
"""

import math

import pytest
from gloo import run_gloo

pytestmark = pytest.mark.slow

OFFLOAD = {"device": "cpu"}


def _zero(stage, offload):
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0}
    if offload:
        zero["offload_optimizer"] = OFFLOAD
    return {"zero_optimization": zero, "zero_force_ds_cpu_optimizer": False}


RUNS = [(stage, offload) for stage in (2, 3) for offload in (False, True)]


@pytest.fixture(scope="module")
def norms():
    runs = [dict(stage=stage, dtype="fp32", steps=6, **_zero(stage, offload)) for stage, offload in RUNS]
    per_rank = run_gloo(2, "ds_sim:train_many", runs)
    return {key: [rank[i]["grad_norms"] for rank in per_rank] for i, key in enumerate(RUNS)}


@pytest.mark.parametrize("stage", [2, 3])
def test_offloaded_clipping_uses_the_norm_of_the_masked_gradients(norms, stage):
    plain, offloaded = norms[(stage, False)][0], norms[(stage, True)][0]
    assert len(plain) == len(offloaded) == 6 and all(n is not None and n > 0 for n in plain + offloaded)
    for step, (a, b) in enumerate(zip(plain, offloaded)):
        assert math.isclose(a, b, rel_tol=1e-5), (step, plain, offloaded)
    assert norms[(stage, True)][1] == offloaded  # every rank clips by the same norm
