"""k hand-written updates captured once in a CUDA graph and replayed: one launch for a training step's updates.

On a small table an update is launch-bound: the fused pass, the sum of its partials, the snapshot and the update
rule are a handful of short kernels, each launched for longer than it runs. A CUDA graph records the
kernels of k updates once; a replay launches all of them with one call. It runs the very kernels the capture
recorded on the very memory, so its numbers are the uncaptured updates' numbers, bit for bit.

What a captured update may do: work on the device only, on tensors that live across calls (parameters, the update
rule's state, X, Y), with no value read back to the host and no Python number that changes from one update to the
next (a learning-rate schedule, Adam's step count, Newton's host-side checks). :func:`capturable` says whether a
set-up qualifies. On CPU nothing is captured: :class:`GraphedUpdates` runs the updates as written.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from neuron_torch.nn.optim import GradientDescent
from neuron_torch.nn.update import apply_update


def capturable(parameters: Iterable[Tensor], optimizer, *, schedule=None, world_size: int = 1,
               host_reads: bool = False) -> bool:
    """Whether k updates of this set-up can be captured in a CUDA graph and replayed with the same numbers.

    Parameters
    ----------
    parameters : iterable of Tensor
        The network's parameters; all must be on a CUDA device.
    optimizer : torch.optim.Optimizer
        The update rule (the inner optimizer, not Lightning's wrapper). Only :class:`GradientDescent` (plain,
        momentum, Nesterov) qualifies: every step after the first runs the same kernels with the same numbers.
        Adam's bias correction is a Python number that changes every step; Newton reads the Hessian's
        factorisation back to the host.
    schedule : optional
        A learning-rate schedule changes ``lr``, a Python number the capture would freeze: refused.
    world_size : int
        Data-parallel processes; their all-reduce is not captured here: refused above 1.
    host_reads : bool
        Whether an update reads a value back to the host (the gradient-norm stop ``tol > 0``): refused.
    """
    params = list(parameters)
    return (torch.cuda.is_available() and bool(params) and all(p.is_cuda for p in params)
            and type(optimizer) is GradientDescent and schedule is None and world_size == 1 and not host_reads)


def neuron_update(net, optimizer, *batch: Tensor) -> Callable[[], Tensor]:
    """One :func:`~neuron_torch.nn.update.apply_update` of ``net`` on ``batch`` (``X``, ``Y`` and optional row
    weights) as a function for :class:`GraphedUpdates`, returning the update's snapshot, shape (s,).
    ``optimizer`` is the rule itself, not Lightning's wrapper: its step counting would run at capture only."""
    parameters = dict(net.named_parameters())
    return lambda: apply_update(net, optimizer, batch, parameters=parameters).snapshot


def watched(net, optimizer, *tensors: Tensor) -> Callable[[], list]:
    """What a capture of ``net``'s updates depends on besides tensor contents, for :class:`GraphedUpdates`:
    the parameters, the rule's state tensors and learning rates, and ``tensors`` (X, Y)."""

    def now() -> list:
        state = [v for s in optimizer.state.values() for v in s.values()]
        return [*net.parameters(), *state, *(g["lr"] for g in optimizer.param_groups), *tensors]

    return now


class GraphedUpdates:
    """``k`` runs of ``update`` per call; on CUDA, from the second call on, one replay of a CUDA graph.

    The first call runs the updates as written, on a side stream (CUDA graphs ask for that warm-up: Triton
    compiles, cuBLAS sets up, the rule creates its state). The next call with the same :attr:`watched` values
    captures the k updates and replays them; later calls replay. Where a watched tensor has moved to other memory
    (a restored optimizer state) or a watched number changed, the graph is dropped and the next two calls warm up
    and capture again. Without CUDA tensors among the watched values, every call runs the updates as written.

    Parameters
    ----------
    update : callable () -> Tensor, shape (s,)
        One update in place (see :func:`neuron_update`), returning its snapshot. Under capture it runs once as
        Python, recording kernels; it must read nothing back to the host.
    k : int
        Updates per call.
    watched : callable () -> list
        Tensors the updates read or write (compared by address) and Python numbers they use (compared by value);
        see :func:`watched`.

    Examples
    --------
    >>> steps = GraphedUpdates(neuron_update(net, rule, X, Y), 50, watched(net, rule, X, Y))  # doctest: +SKIP
    >>> rows = steps()  # (50, s): the snapshots of 50 updates  # doctest: +SKIP
    """

    def __init__(self, update: Callable[[], Tensor], k: int, watched: Callable[[], list]):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.update, self.k, self.watched = update, int(k), watched
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captures = 0  # how often the updates were captured (once, unless the watched values changed)
        self._out: Tensor | None = None  # the graph's output: (k, s), overwritten by each replay
        self._graph_key: tuple | None = None
        self._warm_key: tuple | None = None

    def __call__(self) -> Tensor:
        """Run the k updates; returns their snapshots, shape (k, s), a tensor of the caller's own."""
        values = self.watched()
        if not any(isinstance(v, Tensor) and v.is_cuda for v in values):
            return self._run()
        key = _key(values)
        if self.graph is not None and key == self._graph_key:
            self.graph.replay()
            return self._out.clone()
        self.graph = self._out = None
        if key != self._warm_key:  # first call, or the state moved: warm up with these k updates
            out = self._run_on_side_stream()
            self._warm_key = _key(self.watched())  # the warm-up may create state (momentum's velocity)
            return out
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = torch.stack([self.update() for _ in range(self.k)])  # recorded, not run
        self.graph, self._out, self._graph_key = graph, out, key
        self.captures += 1
        graph.replay()
        return out.clone()

    def _run(self) -> Tensor:
        return torch.stack([self.update() for _ in range(self.k)])

    def _run_on_side_stream(self) -> Tensor:
        side, main = torch.cuda.Stream(), torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = self._run()
        main.wait_stream(side)
        return out


def _key(values: list) -> tuple:
    """Tensors by device, address, shape and dtype; anything else by value."""
    return tuple((v.device, v.data_ptr(), tuple(v.shape), v.dtype) if isinstance(v, Tensor) else v for v in values)
