"""The paper's counter-example (Taniguchi et al., 2024, Sec. 5): Adam with a small beta2 goes the wrong way.

f_t(x) = k^2 x with probability 1/k, else -k x, on [-1, 1]: the mean objective is f(x) = x, minimised at
x = -1. With k = 10, beta1 = 0.9, beta2 = 0.1 and lr_t = 0.01/sqrt(1 + 0.01 t), Adam drifts to +1 while
ADOPT (the paper's unclipped Algorithm 1) converges towards -1. Every element of x is one independent run.
"""

from __future__ import annotations

import torch

import adoptim

K, RUNS, STEPS = 10, 256, 5000


def _final_x(make_opt) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(RUNS, dtype=torch.float64, requires_grad=True)
    opt = make_opt([x])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (1 + 0.01 * t) ** -0.5)
    for _ in range(STEPS):
        rare = torch.rand(RUNS, generator=gen, dtype=torch.float64) < 1.0 / K
        x.grad = torch.where(rare, float(K * K), float(-K)).to(torch.float64)
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(-1.0, 1.0)  # projection onto the feasible set
    return x.detach()


def test_oracle_mean_is_the_objective_gradient() -> None:
    assert K * K * (1 / K) + (-K) * (1 - 1 / K) == 1.0  # E[grad f_t] = f'(x) = 1


def test_adam_diverges_to_the_wrong_end_and_adopt_converges() -> None:
    adam = _final_x(lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.1)))
    adopt = _final_x(lambda p: adoptim.ADOPT(p, lr=0.01, betas=(0.9, 0.1), clip_exponent=None))
    q = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    assert adam.median() > 0.5 and adam.quantile(0.25) > 0.0, adam.quantile(q)
    assert adopt.median() < -0.5 and adopt.quantile(0.75) < 0.0, adopt.quantile(q)
