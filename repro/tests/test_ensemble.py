"""Member k of an ensemble (seeds stacked, one optimizer call per step) trains as the same run alone.

Each member sees its own batches. The ensemble's forward is a batched matrix product over the stack
(``torch.vmap`` of the member's forward); the run alone multiplies one member's matrices. Both compute
every output as the same dot product in float32, but a batched kernel may sum its terms in another
order, so the two can differ by a few float32 ulps per step. Over 30 steps of an elementwise optimizer
on parameters of order 0.1 that stays within ``atol=1e-6`` (measured: at most 6e-8, one ulp); a mistake
in the stacking (members mixed up, a gradient summed over members, a state shared) moves parameters by
1e-3 or more (the members differ from each other by more than 1e-2).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adoptim_repro.ensemble import Ensemble
from adoptim_repro.optimizers import OptimSpec, make_optimizer

K, STEPS = 3, 30
SPECS = {"adam": OptimSpec(lr=1e-2, betas=(0.9, 0.999), eps=1e-8),
         "amsgrad": OptimSpec(lr=1e-2, betas=(0.9, 0.999), eps=1e-8),
         "adopt": OptimSpec(lr=1e-2, betas=(0.9, 0.9999), eps=1e-6)}


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def _batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + seed)
    return [(torch.randn(8, 12, generator=gen), torch.randint(0, 4, (8,), generator=gen)) for _ in range(STEPS)]


@pytest.mark.parametrize("name", list(SPECS))
def test_member_k_equals_its_run_alone(name: str) -> None:
    alone = []
    for k in range(K):
        model = _mlp(k)
        opt = make_optimizer(name, model.parameters(), SPECS[name])
        for x, y in _batches(k):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        alone.append(model)
    ens = Ensemble([_mlp(k) for k in range(K)])
    opt = make_optimizer(name, ens.parameters(), SPECS[name])
    data = [_batches(k) for k in range(K)]
    for step in range(STEPS):
        x = torch.stack([data[k][step][0] for k in range(K)])
        y = torch.stack([data[k][step][1] for k in range(K)])
        opt.zero_grad()
        Ensemble.sum_of_means(nn.functional.cross_entropy, ens(x), y).backward()
        opt.step()
    for k, model in enumerate(alone):
        mine = ens.member_state(k)
        for pname, p in model.named_parameters():
            torch.testing.assert_close(mine[pname], p.detach(), rtol=1e-5, atol=1e-6, msg=f"{name} member {k} {pname}")
    names = [n for n, _ in alone[0].named_parameters()]
    moved = max((ens.member_state(0)[n] - ens.member_state(1)[n]).abs().max().item() for n in names)
    assert moved > 1e-2  # the members are different runs


def test_bad_ensembles_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one member"):
        Ensemble([])
    with pytest.raises(ValueError, match="share one architecture"):
        Ensemble([nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2))])
    with pytest.raises(ValueError, match="leading dimension must be the ensemble size 2"):
        Ensemble([nn.Linear(2, 2), nn.Linear(2, 2)])(torch.zeros(3, 5, 2))


class _Tied(nn.Module):
    # An embedding whose matrix is also the output layer's (GPT's weight tying).
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(idx)))


def test_a_tied_parameter_stays_tied_in_the_ensemble() -> None:
    members = []
    for k in range(2):
        torch.manual_seed(k)
        members.append(_Tied())
    ens = Ensemble(members)
    assert [n for n, _ in ens.named_parameters()] == ["stacked.0"]  # stacked once
    idx = torch.tensor([[0, 3, 4], [1, 1, 2]])
    ens(idx).square().sum().backward()
    for k, m in enumerate(members):
        m(idx[k]).square().sum().backward()  # its gradient: through the embedding and the output layer
        torch.testing.assert_close(ens.stacked[0].grad[k], m.emb.weight.grad, rtol=1e-6, atol=1e-7)
