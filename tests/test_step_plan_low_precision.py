"""The entries of low-precision groups kept from one step to the next (``adoptim/_plan.py``'s ``SplitPlan``).

A low-precision group steps as two entries: its small parameters with full state, and the others with
8-bit or bfloat16 records of their moments (``adoptim/low_precision.py``). A steady loop reuses both, with
new gradients. Each test runs two optimizers on equal copies of the same parameters: one keeps its entries,
the other collects them afresh at every step (as before entries were kept). Both get the same change to
something the entries rest on, then the same gradients, and must agree bit for bit on every parameter and
state tensor after the step: a kept entry that missed the change steps the old tensor, the old seed, the
old split or the old learning rate, and differs. The facts are checked in C where the library is built and
in Python otherwise: every test runs with each.
"""

from __future__ import annotations

import copy
import gc
import weakref
from collections.abc import Callable

import pytest
import torch
from optim_helpers import FACTS_CHECKERS, use_facts_checker

import adoptim
from adoptim import _plan, low_precision

PRECISIONS = ["8bit", "bfloat16"]
SHAPES = [(64, 64), (8,), (4096,), (3, 5)]  # two with low-precision state (4096 elements), two small


@pytest.fixture(autouse=True, params=FACTS_CHECKERS)
def facts_checker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    use_facts_checker(request.param, _plan, monkeypatch)
    return request.param


class Twins:
    """Two optimizers on equal parameters: ``kept`` keeps its entries, ``fresh`` collects them at every step."""

    def __init__(self, precision: str, **options: object) -> None:
        gen = torch.Generator().manual_seed(0)
        values = [torch.randn(s, generator=gen) for s in SHAPES]
        self.params = {name: [torch.nn.Parameter(x.clone()) for x in values] for name in ("kept", "fresh")}
        self.opts = {name: adoptim.ADOPT(ps, lr=1e-2, weight_decay=0.1, state_precision=precision, **options)
                     for name, ps in self.params.items()}
        self.opts["fresh"]._kept_split.lists = lambda groups, state: None
        self.seed = 100

    def both(self, change: Callable[[list[torch.nn.Parameter], adoptim.ADOPT], None]) -> None:
        for name in ("kept", "fresh"):
            change(self.params[name], self.opts[name])

    def step_after(self, change: Callable[[list[torch.nn.Parameter], adoptim.ADOPT], None]) -> None:
        """The same change on both, then the same new gradients and a step: both must agree after it."""
        self.both(change)
        self.grads()
        self.step()

    def grads(self, which: list[int] | None = None) -> None:
        """The same new gradients on both (on the parameters ``which``, default all)."""
        self.seed += 1
        for ps in self.params.values():
            gen = torch.Generator().manual_seed(self.seed)
            for i, p in enumerate(ps):
                g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                if which is None or i in which:
                    p.grad = g

    def step(self) -> None:
        for opt in self.opts.values():
            opt.step()
        self.assert_equal()

    def assert_equal(self) -> None:
        a, b = self.params["kept"], self.params["fresh"]
        for i, (p, q) in enumerate(zip(a, b, strict=True)):
            assert torch.equal(p.detach(), q.detach()), f"parameter {i} differs"
            sa, sb = self.opts["kept"].state.get(p, {}), self.opts["fresh"].state.get(q, {})
            assert sorted(sa) == sorted(sb), f"state keys of parameter {i} differ"
            for key in sa:
                assert torch.equal(sa[key], sb[key]), f"state {key!r} of parameter {i} differs"

    def warm(self, steps: int = 3) -> None:
        """Steps until the kept optimizer steps from kept entries (its collection no longer runs)."""
        for _ in range(steps):
            self.grads()
            self.step()
        calls = []
        real = low_precision.check
        try:
            low_precision.check = lambda *a, **k: calls.append(1) or real(*a, **k)
            self.grads()
            self.opts["kept"].step()
            assert not calls, "a steady step ran the low-precision collection: nothing was kept"
            calls_fresh = len(calls)
            self.opts["fresh"].step()
            assert len(calls) > calls_fresh, "the fresh optimizer kept its entries"
        finally:
            low_precision.check = real
        self.assert_equal()


def assert_refused(opt: adoptim.ADOPT, params: list[torch.nn.Parameter], match: str) -> None:
    """``opt.step()`` raises a RuntimeError matching ``match`` and leaves every parameter as it was."""
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params, strict=True))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_steady_steps_from_kept_entries_equal_fresh_ones(precision: str) -> None:
    twins = Twins(precision)
    twins.warm()
    for _ in range(3):
        twins.grads()
        twins.step()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_learning_rate_changed_between_steps_reaches_both_parts(precision: str) -> None:
    twins = Twins(precision)
    twins.warm()
    twins.step_after(lambda ps, opt: opt.param_groups[0].__setitem__("lr", 3e-2))  # as a scheduler does


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("which", [0, 1], ids=["low-precision parameter", "small parameter"])
def test_parameter_data_replaced(precision: str, which: int) -> None:
    twins = Twins(precision)
    twins.warm()

    def change(ps: list, opt: adoptim.ADOPT) -> None:
        ps[which].data = ps[which].data + 1.0

    twins.step_after(change)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_parameter_dtype_changed(precision: str) -> None:
    twins = Twins(precision)
    twins.warm()

    def change(ps: list, opt: adoptim.ADOPT) -> None:
        ps[2].data = ps[2].data.double()  # no longer a float32 parameter: the torch path steps it

    twins.step_after(change)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("option", ["state_precision", "state_min_size"])
def test_storage_option_changed_between_steps(precision: str, option: str) -> None:
    twins = Twins(precision)
    twins.warm()
    value = {"state_precision": "bfloat16" if precision == "8bit" else "8bit",
             "state_min_size": 5000}[option]  # 5000: the 4096-element parameters become small (full state)
    twins.step_after(lambda ps, opt: opt.param_groups[0].__setitem__(option, value))
    twins.grads()
    twins.step()


def test_block_size_changed_between_steps_is_refused_as_on_a_fresh_step() -> None:
    """8-bit state keeps the blocks it was made with; a step under another state_block_size refuses it by
    name (a kept record would step it in the old blocks)."""
    twins = Twins("8bit")
    twins.warm()
    twins.both(lambda ps, opt: opt.param_groups[0].__setitem__("state_block_size", 128))
    twins.grads()
    for ps, opt in zip(twins.params.values(), twins.opts.values(), strict=True):
        assert_refused(opt, ps, "param group 0 parameter 0 does not match it.*blocks of 128")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_gradient_appears_and_disappears(precision: str) -> None:
    twins = Twins(precision)
    for _ in range(3):
        twins.grads(which=[0, 1, 3])
        twins.step()
    twins.grads()  # parameter 2 gets its first gradient
    twins.step()
    twins.both(lambda ps, opt: setattr(ps[0], "grad", None))
    twins.grads(which=[1, 2, 3])
    twins.step()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_param_group_added(precision: str) -> None:
    twins = Twins(precision)
    twins.warm()
    extra = torch.randn(4096, generator=torch.Generator().manual_seed(5))

    def change(ps: list, opt: adoptim.ADOPT) -> None:
        ps.append(torch.nn.Parameter(extra.clone()))
        opt.add_param_group({"params": [ps[-1]], "lr": 5e-2})

    twins.step_after(change)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_load_state_dict_replaces_the_state(precision: str) -> None:
    twins = Twins(precision)
    other = Twins(precision)
    for _ in range(5):
        other.grads()
        other.step()
    twins.warm()
    saved = other.opts["fresh"].state_dict()
    # Each its own copy: load_state_dict may take the tensors of the dict as they are.
    twins.step_after(lambda ps, opt: opt.load_state_dict(copy.deepcopy(saved)))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_rounding_seed_written_in_place(precision: str) -> None:
    """The records hold each seed's value: a seed loaded in place (as torch.distributed.checkpoint loads
    into the tensors of a state_dict) must reach the next step's rounding."""
    twins = Twins(precision)
    twins.warm()
    twins.step_after(lambda ps, opt: opt.state[ps[0]]["rounding_seed"].fill_(12345))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_state_key_replaced(precision: str) -> None:
    twins = Twins(precision)
    twins.warm()

    def change(ps: list, opt: adoptim.ADOPT) -> None:
        st = opt.state[ps[2]]
        st["exp_avg_sq"] = st["exp_avg_sq"].clone()  # a new tensor of equal values
        st["exp_avg"].zero_() if precision == "bfloat16" else st["exp_avg_absmax"].mul_(2)

    twins.step_after(change)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_plain_entry_then_key(precision: str) -> None:
    """An entry set to a plain dict counts no writes of its keys: they are compared at every step."""
    twins = Twins(precision)
    twins.warm()
    entries = {}

    def plain(ps: list, opt: adoptim.ADOPT) -> None:
        entries[id(opt)] = dict(opt.state[ps[0]])
        opt.state[ps[0]] = entries[id(opt)]

    twins.both(plain)
    for _ in range(2):  # kept again, with the plain entry
        twins.grads()
        twins.step()
    key = "exp_avg_sq_absmax" if precision == "8bit" else "exp_avg_sq"

    def change(ps: list, opt: adoptim.ADOPT) -> None:
        entries[id(opt)][key] = entries[id(opt)][key].clone() * 4

    twins.step_after(change)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_state_data_replaced_by_a_shorter_tensor_is_refused_by_name(precision: str) -> None:
    """A moment whose storage no longer fits its parameter is refused before anything changes, as on a
    fresh step (a kept record stepping it would write past its end)."""
    twins = Twins(precision)
    twins.warm()
    opt, ps = twins.opts["kept"], twins.params["kept"]
    codes = opt.state[ps[0]]["exp_avg"]
    codes.data = codes.data[:100].clone()
    twins.grads()
    assert_refused(opt, ps, "param group 0 parameter 0")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_gradient_data_of_another_dtype(precision: str) -> None:
    twins = Twins(precision)
    twins.warm()
    twins.grads()

    def change(ps: list, opt: adoptim.ADOPT) -> None:
        ps[0].grad.data = ps[0].grad.data.double()  # the .grad setter refuses this; .data does not

    twins.both(change)
    for opt in twins.opts.values():
        opt.step()
    twins.assert_equal()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_sparse_gradient_after_steady_steps_is_refused_by_name(precision: str) -> None:
    twins = Twins(precision)
    twins.warm()
    opt, ps = twins.opts["kept"], twins.params["kept"]
    twins.grads()
    ps[0].grad = ps[0].grad.to_sparse()
    assert_refused(opt, ps, "sparse gradients \\(param group 0 parameter 0\\)")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_kept_entries_do_not_keep_gradients_alive(precision: str) -> None:
    twins = Twins(precision)
    twins.warm()
    refs = [weakref.ref(p.grad) for p in twins.params["kept"]]
    twins.opts["kept"].zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_full_and_a_low_precision_group_both_step_from_kept_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beside a full-precision group both are kept (the full group's collection once the low group's state
    exists), and the steps equal fresh ones."""
    def make(fresh: bool) -> tuple[list, adoptim.ADOPT]:
        gen = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((64, 64), (8,), (4096,))]
        opt = adoptim.ADOPT([{"params": params[:2], "state_precision": "8bit"}, {"params": params[2:]}], lr=1e-2)
        if fresh:
            opt._kept_split.lists = lambda groups, state: None
        return params, opt

    def step(params: list, opt: adoptim.ADOPT, k: int) -> None:
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * k + i))
        opt.step()

    (a, opt_a), (b, opt_b) = make(False), make(True)
    for k in range(4):
        step(a, opt_a, k)
        step(b, opt_b, k)
    calls = []
    real_init, real_check = opt_a._init_group, low_precision.check
    monkeypatch.setattr(opt_a, "_init_group", lambda *x, **kw: calls.append("init") or real_init(*x, **kw))
    monkeypatch.setattr(low_precision, "check", lambda *x, **kw: calls.append("check") or real_check(*x, **kw))
    step(a, opt_a, 4)
    assert calls == []
    monkeypatch.undo()
    step(b, opt_b, 4)
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p.detach(), q.detach())
        assert all(torch.equal(x, opt_b.state[q][key]) for key, x in opt_a.state[p].items())
