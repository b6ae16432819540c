"""Pieces the kernel wrappers and the dispatcher share."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

__all__ = ["has_repeats", "without_amp"]


def without_amp(
    kernel: Callable[..., None],
    lists: Iterable[list[Tensor]],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    hyper: dict[str, Any],
) -> None:
    """Run a kernel that knows nothing of AMP on (params, grads, exp_avgs, exp_avg_sqs, state_steps).

    A nonzero ``found_inf`` (read on the host: a synchronisation) skips the call; the gradients are
    divided by ``grad_scale`` first, into new tensors (the ``.grad`` tensors keep their values).
    """
    params, grads, exp_avgs, exp_avg_sqs, state_steps = lists
    if found_inf is not None and float(found_inf) != 0.0:
        return
    if grad_scale is not None:
        grads = [g / grad_scale.to(g.device) for g in grads]
    kernel(params, grads, exp_avgs, exp_avg_sqs, state_steps, **hyper)


def has_repeats(addresses: Iterable[int], numels: Iterable[int]) -> bool:
    """Whether two tensors with elements start at the same address (a parameter listed twice).

    torch.optim only warns about a repeated parameter; a fused kernel would update both entries at
    once, in two threads or programs, where the for-loop kernel gives the two updates in order.
    """
    addresses = list(addresses)
    if len(set(addresses)) == len(addresses):  # the usual case, decided in one pass in C
        return False
    with_elements = [a for a, n in zip(addresses, numels) if n]  # empty tensors may share an address
    return len(set(with_elements)) < len(with_elements)
