"""Where a training step's time goes: timers on modules, forward and backward.

Taught in Appendix B (Performance). PyTorch calls a forward pre-hook just before a
module's `forward` and a forward hook just after it, and a full backward pre-hook and
hook around the gradients flowing back through it. On a CPU the autograd engine runs one
operation at a time, so the time between a module's two hooks is its share of the step.
`ModuleTimer` sums those intervals per named group of modules; `profile_step` takes one
optimizer step and splits its time into data, the groups, the rest and the optimizer.
On a GPU kernels run asynchronously, so these wall-clock intervals would mislead there:
use `torch.profiler` instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from buildllm.optim import cross_entropy

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11


class ModuleTimer:
    """Sum the seconds each named group of modules spends in forward and backward.

    `seconds[name]` is the total since construction or the last `reset()`. The hooks stay
    until `remove()`, or the end of a `with ModuleTimer(...) as timer:` block. Modules of
    one group must not nest (their intervals would count twice).
    """

    def __init__(self, groups: Mapping[str, Iterable[nn.Module]]) -> None:
        self.seconds = dict.fromkeys(groups, 0.0)
        self._started: dict[str, float] = {}
        self._handles: list[Any] = []
        for name, modules in groups.items():
            begin, end = self._begin(name), self._end(name)
            for module in modules:
                self._handles += [
                    module.register_forward_pre_hook(begin),
                    module.register_forward_hook(end),
                    module.register_full_backward_pre_hook(begin),
                    module.register_full_backward_hook(end),
                ]

    def _begin(self, name: str) -> Callable[..., None]:
        def hook(*args: Any) -> None:
            self._started[name] = time.perf_counter()

        return hook

    def _end(self, name: str) -> Callable[..., None]:
        def hook(*args: Any) -> None:
            self.seconds[name] += time.perf_counter() - self._started[name]

        return hook

    def reset(self) -> None:
        """Set every group's total back to zero."""
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def remove(self) -> None:
        """Remove every hook: the modules run as if never timed."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def profile_step(
    model: nn.Module,
    optimizer: Any,
    next_batch: Callable[[], tuple[Tensor, Tensor]],
    timer: ModuleTimer,
) -> dict[str, float]:
    """Take one training step and return the seconds each part of it took.

    Parts: "data" (`next_batch()`), one entry per group of `timer`, "rest" (the forward
    and backward time outside those groups: embeddings, norms, head and loss) and
    "optimizer" (`step` and `zero_grad`). They add up to the step's wall time.
    """
    timer.reset()
    t0 = time.perf_counter()
    x, y = next_batch()
    t1 = time.perf_counter()
    cross_entropy(model(x), y).backward()
    t2 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    rest = (t2 - t1) - sum(timer.seconds.values())
    return {"data": t1 - t0, **timer.seconds, "rest": rest, "optimizer": t3 - t2}
