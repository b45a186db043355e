"""``model.update_rule: newton`` trains the single neuron through Lightning to scikit-learn's optimum in a few
updates (float64, full batch), and is refused, with a one-line reason, for deeper networks."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression

import neuron_torch.cli.config as cli_module
from neuron_torch.cli.commands import train

L2 = 0.01


def test_newton_reaches_sklearn_optimum_in_a_few_updates(tracking_uri, runs_of, monkeypatch):
    built = []
    build = cli_module.build_cli
    monkeypatch.setattr(cli_module, "build_cli", lambda args=None: built.append(build(args)) or built[-1])
    args = ["--model.update_rule", "newton", "--model.learning_rate", "1", "--model.l2", str(L2),
            "--model.tol", "1e-10", "--trainer.precision", "64-true", "--trainer.max_steps", "50",
            "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "50"]
    assert train(args) == 0
    (cli,) = built
    model = cli.model
    # Newton's error squares each update: from zeros, ‖∇‖ < 1e-10 within a handful of updates (GD needs 10³+)
    assert model.converged_at is not None and model.converged_at <= 10

    # scikit-learn on the same standardised training split: C = 1/(λ·m) gives the same objective
    X, Y = (t.numpy() for t in cli.datamodule.split("train"))
    m = X.shape[0]
    sk = LogisticRegression(C=1 / (L2 * m), tol=1e-12, max_iter=100_000).fit(X, Y[:, 0])
    w = model.net.linear.weight.detach().numpy()[0]
    b = float(model.net.linear.bias.detach()[0])
    np.testing.assert_allclose(w, sk.coef_[0], atol=1e-6)
    assert abs(b - sk.intercept_[0]) < 1e-6
    (run,) = runs_of(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/accuracy"] >= 0.95


def test_newton_with_hidden_layers_is_a_clear_error(tracking_uri, runs_of, capsys):
    assert train(["--model.update_rule", "newton", "--model.hidden_sizes", "[4]", "--trainer.max_steps", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: model.update_rule newton is for networks without hidden layers")
    assert runs_of(tracking_uri) == []
