"""Low-precision state (``state_precision`` "8bit" and "bfloat16") under DDP, FSDP2 and distributed checkpoints.

Every comparison is bit for bit (``torch.equal``): the expectation is the same optimizer in this process
on the same gradient, and a 2-process gradient average is the same bits as the one computed here (see
``dist_lowp_workers.averaged_run``). Under FSDP2 the second process's shards do not start at the
parameter's first element, so they step on the torch path of the low-precision kernel while this process
steps whole parameters with the fused one: the comparison checks that a shard draws the random numbers of
its elements' places in the whole parameter, and that its 8-bit blocks are the whole parameter's.
"""

from __future__ import annotations

import dist_lowp_workers as L
import pytest
import torch
from dist_harness import launch, needs_gloo

FIRST, TOTAL = 3, 6
PRECISIONS = ["8bit", "bfloat16"]
STATE_DTYPE = {"8bit": torch.uint8, "bfloat16": torch.bfloat16}

pytestmark = needs_gloo


def _assert_equal(res: dict, params: list[torch.Tensor], opt, what: str) -> None:
    """``res`` (a worker's snapshot: whole parameters and state) equals the one-process ``params`` and ``opt``."""
    for i, (a, b) in enumerate(zip(res["params"], params, strict=True)):
        assert torch.equal(a, b), f"{what}: parameter {i} differs by {(a - b).abs().max():.3g}"
    expected = [opt.state[p] for p in opt.param_groups[0]["params"]]
    for i, (got, exp) in enumerate(zip(res["state"], expected, strict=True)):
        assert got.keys() == exp.keys(), f"{what}: parameter {i} state keys"
        for k in exp:
            # A shard's codes and scales are laid out as its parameter; the one-process state is flat.
            assert torch.equal(got[k].reshape(-1), exp[k].reshape(-1)), f"{what}: parameter {i} {k} differs"


def _moved(params: list[torch.Tensor]) -> None:
    """The run moved every parameter element (so equality says something)."""
    for i, (p, p0) in enumerate(zip(params, L.make_model().parameters(), strict=True)):
        assert (p != p0).all(), f"parameter {i} has elements that did not move"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_ddp_equals_one_process_on_the_averaged_gradient_and_resumes_exactly(precision, tmp_path):
    params, opt = L.averaged_run(precision, TOTAL, 2)
    _moved(params)
    assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].dtype == STATE_DTYPE[precision]
    path = str(tmp_path / "step3")
    for rank, res in enumerate(launch(L.ddp, 2, precision, path, FIRST, TOTAL)):
        _assert_equal(res, params, opt, f"DDP rank {rank}")
    # A fresh 2-process group loads the checkpoint of step 3 and trains on: where the run ended.
    for rank, res in enumerate(launch(L.ddp_resume, 2, precision, path, FIRST, TOTAL)):
        _assert_equal(res, params, opt, f"resumed DDP rank {rank}")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fsdp2_shards_step_as_the_whole_parameters(precision):
    params, opt = L.averaged_run(precision, TOTAL, 2)
    results = launch(L.fsdp2, 2, precision, TOTAL)
    for rank, res in enumerate(results):
        _assert_equal(res, params, opt, f"FSDP2 rank {rank}")
        weights = [res["layout"][0], res["layout"][2]]
        rows = [res["local_rows"][0], res["local_rows"][2]]
        assert rows == ([4, 3] if rank == 0 else [4, 2])
        for layout, n_rows, cols in zip(weights, rows, (L.IN, L.HIDDEN)):
            # The local shard's state, as DTensors: codes of its rows, one scale per block of each row.
            assert layout["exp_avg"] == (STATE_DTYPE[precision], True, (n_rows, cols))
            if precision == "8bit":
                assert layout["exp_avg_sq_absmax"] == (torch.float32, True, (n_rows, cols // L.BLOCK))
            assert layout["rounding_seed"][:2] == (torch.int64, False)
        # Rows that are not whole blocks (8-bit), or a 1-D parameter, keep full state, as a small parameter.
        for shape, state in zip(("(4, 12)", "(40,)"), res["unaligned"]):
            aligned = precision == "bfloat16"
            want = STATE_DTYPE[precision] if aligned else torch.float32
            assert state["exp_avg"] == (want, True), f"{precision} state of a {shape} shard: {state}"
            assert ("rounding_seed" in state) == aligned


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fsdp2_checkpoint_resumes_exactly_on_one_two_and_four_processes(precision, tmp_path):
    params, opt = L.fixed_run(precision, TOTAL)
    _moved(params)
    path = str(tmp_path / "step3")
    uninterrupted = launch(L.fsdp2_fixed, 2, precision, path, FIRST, TOTAL, False)
    for rank, res in enumerate(uninterrupted):
        _assert_equal(res, params, opt, f"uninterrupted FSDP2 rank {rank}")
    for world_size in (2, 1, 4):
        results = launch(L.fsdp2_fixed, world_size, precision, path, FIRST, TOTAL, True, timeout=120)
        for rank, res in enumerate(results):
            _assert_equal(res, params, opt, f"resumed on {world_size} processes, rank {rank}")
        if world_size == 4:  # the second weight's 5 rows as 2 + 2 + 1 + 0: an empty shard resumed too
            assert [res["local_rows"][2] for res in results] == [2, 2, 1, 0]


def test_a_shard_draws_the_random_numbers_of_its_places_in_the_whole_parameter():
    from adoptim.kernels.quant import quantize_8bit, round_bfloat16, uniform

    whole = uniform(12345, 1000)
    assert torch.equal(uniform(12345, 300, offset=700), whole[700:])
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    codes, absmax = quantize_8bit(x, True, 8, 99)
    part = quantize_8bit(x[400:], True, 8, 99, offset=400)  # 400: a block boundary
    assert torch.equal(part[0], codes[400:]) and torch.equal(part[1], absmax[50:])
    assert torch.equal(round_bfloat16(x[400:], 99, offset=400), round_bfloat16(x, 99)[400:])
    assert not torch.equal(round_bfloat16(x[400:], 99), round_bfloat16(x, 99)[400:])  # the offset matters


@pytest.mark.parametrize("precision", PRECISIONS)
def test_whole_state_dict_of_a_sharded_run_loads_into_one_unsharded_process(precision):
    # get_state_dict(full_state_dict=True) gathers the shards: codes of the parameter's shape and scales
    # per row, which an unsharded optimizer takes as its flat state of the same blocks.
    from torch.distributed.checkpoint.state_dict import set_state_dict

    gathered = launch(L.fsdp2_gathered, 2, precision, FIRST)[0]
    model = L.make_model()
    opt = L.make_opt(model, precision)
    set_state_dict(model, opt, model_state_dict=gathered["model"], optim_state_dict=gathered["optim"])
    assert opt.state[model[0].weight]["exp_avg"].shape == (L.HIDDEN * L.IN,)
    L.train_fixed(model, opt, range(FIRST, TOTAL))
    params, expected = L.fixed_run(precision, TOTAL)
    _assert_equal(L.snapshot(model, opt), params, expected, "gathered state resumed in one process")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_sharded_state_that_does_not_fit_is_refused_naming_the_parameter(precision):
    for rank, res in enumerate(launch(L.fsdp2_bad_state, 2, precision, 2)):
        assert res["unchanged"], f"rank {rank}: a refused load changed the parameters or the state"
        for case, error in res["errors"].items():
            assert error is not None and "\n" not in error, f"rank {rank}, {case}: {error!r}"
            assert error.startswith("state of param group 0 parameter 0 does not match it"), error
            assert "(a DTensor placed (Shard(dim=0),), as its parameter)" in error, error


@pytest.mark.parametrize("target", ["full", "bfloat16"])
def test_an_8bit_checkpoint_loaded_through_dcp_into_another_precision_is_refused(target, tmp_path):
    # DCP fills the loading optimizer's own state tensors from the saved ones of the same keys: 8-bit codes
    # cast to floats, without their scales. The load names the parameter and the way that works. (dcp.load
    # writes into the tensors get_state_dict handed it, the optimizer's own, before the optimizer sees
    # anything: its state is the cast codes whatever load_state_dict does, which the docs say.)
    path = str(tmp_path / "8bit")
    launch(L.fsdp2_fixed, 2, "8bit", path, FIRST, FIRST, False)
    for rank, res in enumerate(launch(L.fsdp2_load_into, 2, target, path)):
        error = res["error"]
        assert res["kind"] == "ValueError" and "\n" not in error, f"rank {rank}: {res['kind']} {error!r}"
        assert error.startswith("state of param group 0 parameter 0 is 8-bit codes cast to"), error
        assert "state_precision='8bit'" in error, error
        assert not res["unchanged"], f"rank {rank}: dcp.load wrote no state (the case this test is about)"


@pytest.mark.parametrize(("saved", "target"), [("full", "8bit"), ("full", "bfloat16"), ("bfloat16", "8bit")])
def test_a_dcp_checkpoint_without_the_keys_of_another_precision_fails_in_dcp_load(saved, target, tmp_path):
    # The loading optimizer's template asks for keys the checkpoint lacks (the scales, the rounding seeds):
    # dcp.load itself fails, and the optimizer's state is as it was.
    path = str(tmp_path / saved)
    launch(L.fsdp2_fixed, 2, saved, path, FIRST, FIRST, False)
    for rank, res in enumerate(launch(L.fsdp2_load_into, 2, target, path)):
        assert res["error"] is not None, f"rank {rank}: loaded"
        missing = "exp_avg_absmax" if target == "8bit" else "rounding_seed"
        assert missing in res["error"], f"rank {rank}: {res['kind']}: {res['error'][:300]}"
        assert res["unchanged"], f"rank {rank}: the failed load changed the optimizer's state"
