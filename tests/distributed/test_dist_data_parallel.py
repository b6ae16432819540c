"""DDP, FSDP2 and ZeRO with ADOPT on 2 gloo processes equal one process on the same global batch.

Each test runs a real 2-process job (forked workers, one gloo process group) with every kernel, and
compares the whole parameters and optimizer state after ``STEPS`` steps with the same kernel run in
this process on the global batch; that run is itself checked against the float64 reference.
"""

from __future__ import annotations

import dist_workers as W
import pytest
import torch
from dist_harness import (
    ATOL,
    HYPER,
    KERNELS,
    assert_close,
    launch,
    make_model,
    needs_gloo,
    reference_run,
    single_process,
)

from adoptim import ADOPT

STEPS = 6

pytestmark = needs_gloo


@pytest.fixture(scope="module")
def reference() -> list[torch.Tensor]:
    return reference_run(STEPS)


def _expected(kernel: dict, reference: list[torch.Tensor]) -> tuple[list[torch.Tensor], ADOPT]:
    params, opt = single_process(kernel, STEPS)
    assert_close(params, reference, "single-process run against the float64 reference")
    # The run must have moved every parameter, or equality below would prove nothing.
    for p, p0 in zip(params, make_model().parameters()):
        assert (p - p0).abs().min() > 100 * ATOL
    return params, opt


def _assert_state(state: list[dict[str, torch.Tensor]], opt: ADOPT, what: str) -> None:
    expected = [opt.state[p] for p in opt.param_groups[0]["params"]]
    for i, (got, exp) in enumerate(zip(state, expected)):
        assert float(got["step"]) == float(exp["step"]) == STEPS, f"{what}: parameter {i} step"
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                got[key], exp[key], atol=ATOL, rtol=0, msg=lambda m, i=i, k=key: f"{what}: {k} of {i}: {m}"
            )


@pytest.mark.parametrize("kernel", KERNELS)
def test_ddp_matches_single_process(kernel, reference):
    params, opt = _expected(kernel, reference)
    results = launch(W.ddp, 2, kernel, STEPS)
    for rank, res in enumerate(results):
        assert_close(res["params"], params, f"DDP rank {rank}")
        _assert_state(res["state"], opt, f"DDP rank {rank}")


@pytest.mark.parametrize("kernel", KERNELS)
def test_fsdp2_dtensor_shards_match_single_process(kernel, reference):
    params, opt = _expected(kernel, reference)
    results = launch(W.fsdp2, 2, kernel, STEPS)
    for rank, res in enumerate(results):
        # The optimizer really stepped DTensor shards, uneven ones and an empty one included.
        assert all(res["dtensor"]) and all(res["dtensor_state"])
        assert_close(res["params"], params, f"FSDP2 rank {rank}")
        _assert_state(res["state"], opt, f"FSDP2 rank {rank}")
    numel = [p.numel() for p in params]
    assert [a + b for a, b in zip(results[0]["local_numel"], results[1]["local_numel"])] == numel
    assert 0 in results[1]["local_numel"], "the problem should give the second process an empty shard"


@pytest.mark.parametrize("kernel", KERNELS)
def test_zero_redundancy_matches_single_process(kernel, reference):
    params, opt = _expected(kernel, reference)
    results = launch(W.zero, 2, kernel, STEPS)
    for rank, res in enumerate(results):
        assert_close(res["params"], params, f"ZeRO rank {rank}")
    # The state is partitioned: each process holds state for its own parameters only.
    owned = [r["owned"] for r in results]
    assert all(n > 0 for n in owned) and sum(owned) == len(params), owned
    # The consolidated state_dict loads into a plain ADOPT and equals the single-process state.
    model = make_model()
    restored = ADOPT(model.parameters(), **HYPER, **kernel)
    restored.load_state_dict(results[0]["state_dict"])
    _assert_state([restored.state[p] for p in model.parameters()], opt, "ZeRO consolidated state")


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradients_placed_otherwise_than_their_parameters(kernel):
    # Tensor parallelism: a Partial gradient of a Replicate parameter, a Shard(1) gradient of a Shard(0)
    # one. The step reduces / redistributes each gradient once, then matches the float64 reference on
    # the whole gradients (for the Partial one, the sum of the processes' unequal shares).
    from adoptim.reference import ReferenceADOPT

    results = launch(W.tensor_parallel, 2, kernel, STEPS)
    params = [p.clone() for p in W.tensor_parallel_start()]
    hyper = {k: v for k, v in HYPER.items() if k != "betas"}
    ref = ReferenceADOPT(params, beta1=HYPER["betas"][0], beta2=HYPER["betas"][1], **hyper)
    for t in range(STEPS):
        ref.step(W.tensor_parallel_grads(t))
    expected = ref.params()
    for p0, e in zip(W.tensor_parallel_start(), expected):
        assert (e - p0).abs().min() > 100 * ATOL  # every element moved
    for rank, res in enumerate(results):
        assert res["grad_placements"] == ["(Partial(sum),)", "(Shard(dim=1),)"], res["grad_placements"]
        assert_close(res["params"], expected, f"tensor-parallel rank {rank}")
        for st in res["state"]:
            assert float(st["step"]) == STEPS


def test_plain_state_dict_into_a_sharded_optimizer_is_refused_by_name():
    # An unsharded run's opt.state_dict() has plain tensors where FSDP2's parameters are DTensors: the
    # shapes match (DTensor shapes are global), but a step would fail inside DTensor. Refused at load,
    # naming the API that shards a full state dict, with nothing loaded.
    results = launch(W.load_plain_state_into_fsdp2, 2, {"foreach": False}, 2)
    for res in results:
        assert res["error"] is not None and "set_optimizer_state_dict" in res["error"], res["error"]
        assert "is a DTensor but its exp_avg is a Tensor" in res["error"], res["error"]
        assert res["state_entries"] == 0
