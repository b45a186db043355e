"""k updates captured in a CUDA graph give the numbers of the same updates uncaptured, bit for bit; on CPU nothing is
captured. The CUDA tests skip, saying so, without a GPU."""

from __future__ import annotations

import pytest
import torch

from neuron_torch import SingleNeuron
from neuron_torch.train.cuda_graphs import GraphedUpdates, capturable, neuron_update, watched
from neuron_torch.nn.optim import Adam, GradientDescent

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: torch.cuda.is_available() is False")


def problem(device: str, momentum: float = 0.0, m: int = 3000, n: int = 30, l2: float = 0.0):
    """Two identical neurons with their rules, and one table, on ``device``."""
    gen = torch.Generator().manual_seed(7)
    X = torch.randn(m, n, generator=gen)
    Y = (X[:, :1] + 0.5 * torch.randn(m, 1, generator=gen) > 0).float()
    nets = [SingleNeuron(n, "normal", l2=l2, generator=torch.Generator().manual_seed(3)).to(device)
            for _ in range(2)]
    rules = [GradientDescent(net.parameters(), lr=0.5, momentum=momentum) for net in nets]
    return nets, rules, X.to(device), Y.to(device)


def plain_run(net, rule, X, Y, updates: int) -> torch.Tensor:
    update = neuron_update(net, rule, X, Y)
    return torch.stack([update() for _ in range(updates)])


def graphed_run(net, rule, X, Y, k: int, calls: int) -> tuple[torch.Tensor, GraphedUpdates]:
    steps = GraphedUpdates(neuron_update(net, rule, X, Y), k, watched(net, rule, X, Y))
    return torch.cat([steps() for _ in range(calls)]), steps


def test_on_cpu_the_updates_run_as_written():
    (net, ref), (rule, ref_rule), X, Y = problem("cpu", momentum=0.9)
    rows, steps = graphed_run(net, rule, X, Y, k=4, calls=3)
    # exact: the same operations on the same data, in this process
    assert torch.equal(rows, plain_run(ref, ref_rule, X, Y, 12))
    assert steps.graph is None and steps.captures == 0
    assert not capturable(net.parameters(), rule)


def test_k_must_be_positive():
    with pytest.raises(ValueError, match="k must be >= 1"):
        GraphedUpdates(lambda: torch.zeros(1), 0, lambda: [])


@needs_cuda
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("fused", ["1", "0"])
def test_replays_give_the_uncaptured_numbers(momentum, fused, monkeypatch):
    monkeypatch.setenv("NEURON_TORCH_FUSED", fused)  # the Triton kernel, or the reference path's kernels
    (net, ref), (rule, ref_rule), X, Y = problem("cuda", momentum, l2=0.01)
    rows, steps = graphed_run(net, rule, X, Y, k=5, calls=4)  # warm-up, capture + replay, two replays
    ref_rows = plain_run(ref, ref_rule, X, Y, 20)
    # exact: the replay runs the kernels the uncaptured updates run, on the same data
    assert torch.equal(rows, ref_rows)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), ref.parameters()))
    assert steps.captures == 1 and steps.graph is not None


@needs_cuda
def test_moved_state_is_captured_again():
    (net, ref), (rule, ref_rule), X, Y = problem("cuda", momentum=0.9)
    steps = GraphedUpdates(neuron_update(net, rule, X, Y), 3, watched(net, rule, X, Y))
    rows = [steps(), steps()]
    for state in rule.state.values():  # a restored rule state: new tensors, same values
        state["velocity"] = state["velocity"].clone()
    rows += [steps(), steps(), steps()]  # warm-up, capture, replay
    assert steps.captures == 2
    assert torch.equal(torch.cat(rows), plain_run(ref, ref_rule, X, Y, 15))


@needs_cuda
def test_what_can_be_captured():
    (net, _), (rule, _), _, _ = problem("cuda")
    assert capturable(net.parameters(), rule)
    assert not capturable(net.parameters(), Adam(net.parameters(), lr=0.1))  # its step count is a Python number
    assert not capturable(net.parameters(), rule, schedule=object())
    assert not capturable(net.parameters(), rule, world_size=2)
    assert not capturable(net.parameters(), rule, host_reads=True)


@needs_cuda
@pytest.mark.parametrize("rule", ["gd", "momentum"])
def test_lightning_steps_replayed_from_a_graph_equal_single_updates(rule, tmp_path):
    """Through Lightning (no tracking): 10 updates per step, graphed, give the trajectory of 1 update per step."""
    import lightning as L

    from neuron_torch.data.datamodule import NeuronDataModule
    from neuron_torch.train.module import NeuronModule

    rows = []
    for k in (10, 1):
        data = NeuronDataModule()
        module = NeuronModule(data.feature_names, classes=data.classes, update_rule=rule, learning_rate=0.1,
                              updates_per_step=k)
        seen = []

        class Rows(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                seen.append(pl_module.tracked_rows.cpu())

        trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=40, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
                            callbacks=[Rows()], default_root_dir=tmp_path)
        trainer.fit(module, datamodule=data)
        assert trainer.global_step == 40
        rows.append(torch.cat(seen))
        if k > 1:
            assert module.update_loop.graphed is not None and module.update_loop.graphed[1].captures == 1  # captured once, replayed
    torch.testing.assert_close(rows[0], rows[1], rtol=0, atol=0)
