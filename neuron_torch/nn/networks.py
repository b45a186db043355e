"""Networks whose gradients are written by hand: the single neuron and its deeper generalisation.

All hold ``nn.Linear`` layers and share one backward pass (:class:`HandBackprop`): the single neuron is the
network with no hidden layer and one sigmoid unit, :class:`SoftmaxRegression` its k-class form.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from neuron_torch.errors import ConfigError
from neuron_torch.kernels import fused as kernels
from neuron_torch.nn import layers

Init = Literal["zeros", "normal", "xavier", "he"]
ActivationName = Literal["relu", "tanh", "sigmoid", "leaky_relu"]


class BackwardPass(NamedTuple):
    """What one forward and backward pass over a batch yields."""

    loss: Tensor  # shape (), mean cross-entropy plus the L2 penalty
    gradients: dict[str, Tensor]  # keyed like named_parameters()
    Z: list[Tensor]  # pre-activations of each layer, (m, n_l); empty on SingleNeuron's fused path


class HandBackprop(nn.Module):
    """Forward and hand-written backward pass over a stack of ``nn.Linear`` layers.

    Hidden layers apply ``activation``. The output layer is one sigmoid unit trained on the mean binary
    cross-entropy (two classes, labels ``Y`` of shape (m, 1) in {0, 1}) or k softmax units trained on the mean
    cross-entropy (k classes, one-hot ``Y`` of shape (m, k)); either way its ``dZ = A − Y``
    (:data:`neuron_torch.nn.layers.OUTPUTS`). Subclasses define :attr:`linears`, the layers in order.

    Parameters
    ----------
    activation : {"relu", "tanh", "sigmoid", "leaky_relu"}
        The hidden layers' activation ``g``.
    l2 : float
        Weight of the penalty ``(λ/2)·Σ‖W‖²`` added to the loss (biases are not penalised).
    output : {"sigmoid", "softmax"}
        The output head.
    """

    linears: Sequence[nn.Linear]

    def __init__(self, activation: ActivationName = "relu", l2: float = 0.0, output: str = "sigmoid"):
        super().__init__()
        if output not in layers.OUTPUTS:
            raise ConfigError(f"output must be one of {sorted(layers.OUTPUTS)}, got {output!r}")
        self.output = output
        if activation not in layers.ACTIVATIONS:
            raise ConfigError(f"activation must be one of {sorted(layers.ACTIVATIONS)}, got {activation!r}")
        if l2 < 0:
            raise ConfigError(f"l2 must be >= 0, got {l2}")
        self.activation = activation
        self.l2 = float(l2)

    @property
    def n_outputs(self) -> int:
        """Units of the output layer: 1 for two classes (a sigmoid), k for k > 2 classes (a softmax)."""
        return self.linears[-1].out_features

    def forward(self, X: Tensor) -> Tensor:
        """Class probabilities.

        Parameters
        ----------
        X : Tensor, shape (m, n_features)

        Returns
        -------
        A : Tensor, shape (m, 1) or (m, k)
            The probability of label 1 (sigmoid output), or of each class (softmax output).
        """
        return layers.OUTPUTS[self.output].forward(self.logits(X))

    def logits(self, X: Tensor) -> Tensor:
        """Pre-activation ``Z`` of the output layer, shape (m, 1) or (m, k)."""
        g = layers.ACTIVATIONS[self.activation].forward
        A = X
        for layer in self.linears[:-1]:
            A = g(layers.linear_forward(A, layer.weight, layer.bias))  # (m, n_l)
        out = self.linears[-1]
        return layers.linear_forward(A, out.weight, out.bias)  # (m, k)

    def forward_backward(self, X: Tensor, Y: Tensor, weight: Tensor | None = None,
                         l2: float | None = None) -> BackwardPass:
        """Loss and hand-written gradients of every parameter; no autograd graph is built.

        The network's :meth:`fused_pass` is asked first; where it gives nothing, this is the reference pass.

        Parameters
        ----------
        X : Tensor, shape (m, n_features)
            In the parameters' dtype, or converted to it here (bfloat16 storage of ``X``, ``data.dtype``).
        Y : Tensor, shape (m, 1) or (m, k)
            Labels in {0, 1} (sigmoid output) or one-hot rows (softmax output), same dtype as the parameters.
        weight : Tensor, shape (m, 1), optional
            Non-negative sample weights: the loss and every gradient become weighted means,
            ``Σ wᵢ·dZᵢ·xᵢ / Σ wᵢ``.
        l2 : float, optional
            The L2 weight ``λ`` of this pass; None is the network's own :attr:`l2`. A pass over one chunk of
            many gives 0 and adds the penalty once, over all of them (:mod:`neuron_torch.nn.chunked`).

        Returns
        -------
        BackwardPass
        """
        if torch.is_grad_enabled():  # the gradients are written below: no autograd graph is built
            with torch.no_grad():
                return self.forward_backward(X, Y, weight, l2)
        l2 = self.l2 if l2 is None else l2
        fused = self.fused_pass(X, Y, weight, l2)
        if fused is not None:
            return fused
        act = layers.ACTIVATIONS[self.activation]
        head = layers.OUTPUTS[self.output]
        linears = list(self.linears)
        dtype = linears[0].weight.dtype
        X = X if X.dtype == dtype else X.to(dtype)
        # forward, caching each layer's input A_prev and pre-activation Z
        A, A_prevs, Zs = X, [], []
        for i, layer in enumerate(linears):
            A_prevs.append(A)
            Z = layers.linear_forward(A, layer.weight, layer.bias)  # (m, n_l)
            Zs.append(Z)
            A = act.forward(Z) if i < len(linears) - 1 else head.forward(Z)
        loss = head.loss(Zs[-1], Y, weight) + layers.l2_penalty([l.weight for l in linears], l2)

        # backward: the output's sigmoid (softmax) + cross-entropy give dZ = A − Y; then each layer down
        grads: dict[str, Tensor] = {}
        dZ = layers.weight_backward(head.backward(A, Y), weight)  # (m, k), scaled by wᵢ·m/Σw when weighted
        for i in reversed(range(len(linears))):
            layer = linears[i]
            dW, db = layers.linear_backward(dZ, A_prevs[i])  # (n_l, n_{l-1}), (n_l,)
            grads[self._names[i] + "weight"] = layers.l2_backward(dW, layer.weight, l2)
            grads[self._names[i] + "bias"] = db
            if i > 0:
                dA_prev = layers.linear_backward_input(dZ, layer.weight)  # (m, n_{l-1})
                dZ = act.backward(dA_prev, Zs[i - 1], A_prevs[i])  # A_prevs[i] = g(Z_{i-1})
        return BackwardPass(loss, {name: grads[name] for name in self._parameter_names}, Zs)

    def fused_pass(self, X: Tensor, Y: Tensor, weight: Tensor | None, l2: float) -> BackwardPass | None:
        """The same pass in one read of ``X``, where the network has a kernel for it and it applies; None takes
        the reference pass of :meth:`forward_backward`. A network without such a kernel gives None always."""
        return None

    def gradients(self, X: Tensor, Y: Tensor, weight: Tensor | None = None) -> dict[str, Tensor]:
        """Hand-written gradients of the mean cross-entropy (plus L2).

        Parameters
        ----------
        X : Tensor, shape (m, n_features)
        Y : Tensor, shape (m, 1) or (m, k)
        weight : Tensor, shape (m, 1), optional

        Returns
        -------
        dict of str to Tensor
            Keyed exactly like :meth:`named_parameters`, each gradient shaped like its parameter.
        """
        return self.forward_backward(X, Y, weight).gradients

    def loss(self, X: Tensor, Y: Tensor, weight: Tensor | None = None) -> Tensor:
        """Mean cross-entropy (weighted when ``weight`` is given) plus the L2 penalty, shape ()."""
        with torch.no_grad():
            penalty = layers.l2_penalty([layer.weight for layer in self.linears], self.l2)
            return layers.OUTPUTS[self.output].loss(self.logits(X), Y, weight) + penalty

    def hessian(self, X: Tensor, weight: Tensor | None = None) -> Tensor:
        """Hessian of :meth:`loss` with respect to every parameter, flattened in order; written by hand for
        networks without hidden layers (:class:`SingleNeuron`, :class:`SoftmaxRegression`)."""
        raise ConfigError(f"{type(self).__name__} has no hand-written Hessian: Newton's method is for networks "
                         "without hidden layers")

    @functools.cached_property
    def _names(self) -> list[str]:
        """The ``named_parameters`` prefix of each layer, in order (``"linear."``, ``"layers.0."``, ...)."""
        by_id = {id(mod): name for name, mod in self.named_modules()}
        return [by_id[id(layer)] + "." for layer in self.linears]

    @functools.cached_property
    def _parameter_names(self) -> list[str]:
        """``named_parameters()`` keys in order, the order of the gradient dict (looked up once)."""
        return [name for name, _ in self.named_parameters()]

    # --- what the tracker records each update -------------------------------------------------------------

    def tracked_names(self, feature_names: Sequence[str], class_names: Sequence[str] = ()) -> list[str]:
        """Names of the values :meth:`tracked_values` returns: per layer, ``layer<l>/weight_norm``,
        ``layer<l>/grad_norm`` and, for ReLU hidden layers, ``layer<l>/dead_relu``."""
        names = []
        for i in range(len(self.linears)):
            names += [f"layer{i + 1}/weight_norm", f"layer{i + 1}/grad_norm"]
            if self._tracks_dead_units(i):
                names.append(f"layer{i + 1}/dead_relu")
        return names

    def snapshot(self, loss: Tensor, gradients: dict[str, Tensor], bp: BackwardPass) -> Tensor:
        """What the tracker keeps of one update, taken before the parameters change, shape (s,).

        Parameters
        ----------
        loss : Tensor, shape ()
        gradients : dict of str to Tensor
            The gradients the update applies (summed over data-parallel ranks).
        bp : BackwardPass
            The pass they came from.
        """
        grad_norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in gradients.values()]))
        return torch.cat([loss.view(1), grad_norm.view(1), self.tracked_values(bp)])

    def tracked_rows(self, snapshots: Tensor) -> Tensor:
        """Turn a training step's snapshots (k, s) into tracked rows (k, 2 + len(tracked_names)): the loss,
        the gradient norm, then the values of :meth:`tracked_values`."""
        return snapshots

    def tracked_values(self, bp: BackwardPass) -> Tensor:
        """The values named by :meth:`tracked_names`, as one row on the parameters' device."""
        values = []
        for i, (name, layer) in enumerate(zip(self._names, self.linears)):
            values += [layer.weight.norm(), bp.gradients[name + "weight"].norm()]
            if self._tracks_dead_units(i):
                # a unit is dead on this batch when Z ≤ 0 for every sample: it passes no gradient back
                values.append((bp.Z[i] <= 0).all(0).to(layer.weight.dtype).mean())
        return torch.stack(values)

    def _tracks_dead_units(self, i: int) -> bool:
        return self.activation == "relu" and i < len(self.linears) - 1

    def reset_parameters(self, init: Init, generator: torch.Generator | None = None) -> None:
        """Initialise every layer: zeros (the seed recipe), N(0, 0.01²), Xavier/Glorot uniform or He normal."""
        for layer in self.linears:
            nn.init.zeros_(layer.bias)
            if init == "zeros":
                nn.init.zeros_(layer.weight)
            elif init == "normal":
                nn.init.normal_(layer.weight, 0.0, 0.01, generator=generator)
            elif init == "xavier":
                nn.init.xavier_uniform_(layer.weight, generator=generator)
            elif init == "he":
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=generator)
            else:
                raise ConfigError(f"init must be one of zeros, normal, xavier, he; got {init!r}")


class LinearModel(HandBackprop):
    """A network of one ``nn.Linear`` layer, ``self.linear``, and its output head: the generalised linear models.

    What they share: a Hessian written by hand (so :class:`neuron_torch.nn.optim.Newton` applies) and a tracked
    row of every weight and bias per update.
    """

    linear: nn.Linear

    @property
    def linears(self) -> list[nn.Linear]:
        return [self.linear]

    def hessian(self, X: Tensor, weight: Tensor | None = None) -> Tensor:
        """The Hessian of :meth:`loss` (L2 included) with respect to the flattened ``(W, b)``, the one
        :class:`neuron_torch.nn.optim.Newton` solves with."""
        return self.penalised_hessian(self.data_hessian(X, weight))

    def snapshot(self, loss: Tensor, gradients: dict[str, Tensor], bp: BackwardPass) -> Tensor:
        # one copy per update, (loss, b, W, db, dW) of shape (2·k·(n + 1) + 1,); the norms wait for tracked_rows,
        # which takes them for a whole training step at once
        name = self._names[0]
        return torch.cat([loss.view(1), self.linear.bias, self.linear.weight.view(-1), gradients[name + "bias"],
                          gradients[name + "weight"].view(-1)])

    def tracked_rows(self, snapshots: Tensor) -> Tensor:
        size = self.linear.weight.numel() + self.linear.bias.numel()
        loss, values, grads = snapshots[:, :1], snapshots[:, 1:size + 1], snapshots[:, size + 1:]
        return torch.cat([loss, torch.linalg.vector_norm(grads, dim=1, keepdim=True), values], dim=1)

    def tracked_values(self, bp: BackwardPass) -> Tensor:
        return torch.cat([self.linear.bias, self.linear.weight.view(-1)])  # (k + k·n,)


class SingleNeuron(LinearModel):
    """Logistic regression as one sigmoid neuron: ``A = σ(X·wᵀ + b)``.

    Parameters
    ----------
    n_features : int
        Number of input features ``n``; ``self.linear`` is ``nn.Linear(n, 1)``.
    init : {"zeros", "normal", "xavier", "he"}
        Weight initialisation; zeros is the classic recipe and is safe for a single neuron.
    l2 : float
        L2 penalty ``(λ/2)·‖w‖²`` added to the loss and gradients.
    generator : torch.Generator, optional
        Source of randomness for the random initialisations.
    fused : bool
        Take the loss and gradients in one pass over ``X`` (:meth:`fused_pass`, :mod:`neuron_torch.kernels.fused`:
        a small C kernel compiled on first use on CPU, a Triton kernel on CUDA) instead of the reference path's
        two (``Z = X·wᵀ + b``, then ``dZᵀ·X``). The numbers are the same to the dtype's rounding. It applies to
        float32/float64 ``X`` (on CUDA also bfloat16 ``X`` with float32 parameters) whose rows are contiguous,
        with ``Y`` of shape (m, 1), and no sample weights; anything else (float16, a transposed ``X``), a missing
        C compiler or triton, or the environment variable ``NEURON_TORCH_FUSED=0`` takes the reference path. On
        the fused path ``BackwardPass.Z`` is an empty list: ``Z`` is never stored (that is the point).

    Examples
    --------
    >>> import torch
    >>> from neuron_torch import SingleNeuron
    >>> neuron = SingleNeuron(3)
    >>> X, Y = torch.randn(5, 3), torch.ones(5, 1)
    >>> sorted(neuron.gradients(X, Y))
    ['linear.bias', 'linear.weight']
    """

    def __init__(self, n_features: int, init: Init = "zeros", l2: float = 0.0,
                 generator: torch.Generator | None = None, fused: bool = True):
        super().__init__(activation="sigmoid", l2=l2, output="sigmoid")
        self.linear = nn.Linear(n_features, 1)
        self.fused = bool(fused)
        self.reset_parameters(init, generator)

    def fused_pass(self, X: Tensor, Y: Tensor, weight: Tensor | None, l2: float) -> BackwardPass | None:
        """Loss and gradients in one pass over ``X`` (:func:`neuron_torch.kernels.fused.neuron_pass`), for
        unweighted rows; None where it does not apply (``fused`` false, sample weights, or the kernel declines).

        Returns
        -------
        BackwardPass or None
            As the reference pass's, except that ``Z`` is empty: it is never stored.
        """
        if not self.fused or weight is not None:
            return None
        w = self.linear.weight
        out = kernels.neuron_pass(X, Y, w, self.linear.bias)
        if out is None:
            return None
        loss, dw, db = out  # (), (1, n), (1,): the mean cross-entropy and its gradients, no penalty yet
        if l2:  # the same penalty and gradient as the reference path (adding 0 would only cost time)
            loss = loss + layers.l2_penalty([w], l2)
            dw = layers.l2_backward(dw, w, l2)
        name = self._names[0]
        return BackwardPass(loss, {name + "weight": dw, name + "bias": db}, [])

    def data_hessian(self, X: Tensor, weight: Tensor | None = None) -> Tensor:
        """The ``(w, b)`` Hessian of the mean cross-entropy alone, shape (n + 1, n + 1)."""
        with torch.no_grad():
            return layers.bce_hessian(X, self.linear.weight, self.linear.bias, weight)

    def penalised_hessian(self, H: Tensor) -> Tensor:
        """:meth:`data_hessian`'s ``H`` (a mean over rows, or over chunks of rows) plus the L2 term."""
        return layers.l2_hessian(H, self.l2)

    def tracked_names(self, feature_names: Sequence[str], class_names: Sequence[str] = ()) -> list[str]:
        """``b`` then one ``w/<feature name>`` per weight."""
        return ["b"] + [f"w/{name}" for name in feature_names]


class SoftmaxRegression(LinearModel):
    """Multinomial logistic regression: ``A = softmax(X·Wᵀ + b)`` over k classes, the single neuron's k-class
    form (same ``dZ = A − Y``, one-hot ``Y``).

    Parameters
    ----------
    n_features : int
        Number of input features ``n``.
    n_classes : int
        Number of classes ``k`` (at least 3; two classes are the :class:`SingleNeuron`). ``self.linear`` is
        ``nn.Linear(n, k)``.
    init : {"zeros", "normal", "xavier", "he"}
        Weight initialisation; zeros is safe here too (the softmax gradient differs per class).
    l2 : float
        L2 penalty ``(λ/2)·‖W‖²``.
    generator : torch.Generator, optional
        Source of randomness for the random initialisations.
    """

    def __init__(self, n_features: int, n_classes: int, init: Init = "zeros", l2: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__(activation="sigmoid", l2=l2, output="softmax")
        if n_classes < 3:
            raise ConfigError(f"n_classes must be >= 3 (two classes are a SingleNeuron), got {n_classes}")
        self.linear = nn.Linear(n_features, n_classes)
        self.reset_parameters(init, generator)

    def data_hessian(self, X: Tensor, weight: Tensor | None = None) -> Tensor:
        """The ``(W, b)`` Hessian of the mean cross-entropy alone, shape (k·(n + 1), k·(n + 1))."""
        with torch.no_grad():
            return layers.softmax_hessian(X, self.linear.weight, self.linear.bias, weight)

    def penalised_hessian(self, H: Tensor) -> Tensor:
        """:meth:`data_hessian`'s ``H`` plus the L2 term, made invertible along the shifts that change no
        prediction (:func:`neuron_torch.nn.layers.softmax_gauge`)."""
        k, n = self.linear.weight.shape
        return layers.softmax_gauge(layers.l2_hessian(H, self.l2, n_biases=k), k, n, weights_flat=not self.l2)

    def tracked_names(self, feature_names: Sequence[str], class_names: Sequence[str] = ()) -> list[str]:
        """``b/<class>`` per class, then ``w/<class>/<feature>`` class by class."""
        classes = list(class_names) or [str(c) for c in range(self.n_outputs)]
        return [f"b/{c}" for c in classes] + [f"w/{c}/{name}" for c in classes for name in feature_names]


class DeepNetwork(HandBackprop):
    """An L-layer network: hidden ``nn.Linear`` layers with activation ``g``, then one sigmoid output unit
    (two classes) or k softmax units (k classes).

    Parameters
    ----------
    n_features : int
        Number of input features.
    hidden_sizes : sequence of int
        Width of each hidden layer, in order; empty gives the single neuron (under the name ``layers.0``).
    activation : {"relu", "tanh", "sigmoid", "leaky_relu"}
        Hidden activation.
    init : {"he", "xavier", "normal", "zeros"}
        Weight initialisation; zeros is refused with hidden layers, where every unit of a layer would stay
        identical (the symmetry is never broken).
    l2 : float
        L2 penalty ``(λ/2)·Σ‖W‖²`` over all weight matrices.
    generator : torch.Generator, optional
        Source of randomness for the initialisation.
    n_outputs : int
        1 for two classes (a sigmoid unit), k for k > 2 classes (a softmax layer).
    """

    def __init__(self, n_features: int, hidden_sizes: Sequence[int] = (), activation: ActivationName = "relu",
                 init: Init = "he", l2: float = 0.0, generator: torch.Generator | None = None,
                 n_outputs: int = 1):
        super().__init__(activation=activation, l2=l2, output="sigmoid" if n_outputs == 1 else "softmax")
        if n_outputs == 2:
            raise ConfigError("two classes take one sigmoid output unit: n_outputs=1")
        sizes = [n_features, *hidden_sizes, n_outputs]
        if any(int(s) < 1 for s in sizes):
            raise ConfigError(f"layer sizes must be >= 1, got {sizes}")
        if init == "zeros" and hidden_sizes:
            raise ConfigError("init='zeros' cannot train hidden layers: every unit of a layer gets the same "
                             "gradient, so they stay identical; use 'he', 'xavier' or 'normal'")
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.reset_parameters(init, generator)

    @property
    def linears(self) -> nn.ModuleList:
        return self.layers


def build_network(n_features: int, n_classes: int = 2, hidden_sizes: Sequence[int] = (),
                  activation: ActivationName = "relu", init: Init | None = None, l2: float = 0.0,
                  generator: torch.Generator | None = None, fused: bool = True) -> HandBackprop:
    """The network for ``n_classes`` classes: a :class:`SingleNeuron` (2), a :class:`SoftmaxRegression`
    (k > 2), or with hidden layers a :class:`DeepNetwork` with the matching output.

    ``init`` defaults to zeros without hidden layers (the classic recipe) and He with them.
    """
    if n_classes < 2:
        raise ConfigError(f"n_classes must be >= 2, got {n_classes}")
    if hidden_sizes:
        return DeepNetwork(n_features, hidden_sizes, activation, init or "he", l2, generator,
                           n_outputs=1 if n_classes == 2 else n_classes)
    if n_classes == 2:
        return SingleNeuron(n_features, init or "zeros", l2, generator, fused=fused)
    return SoftmaxRegression(n_features, n_classes, init or "zeros", l2, generator)
