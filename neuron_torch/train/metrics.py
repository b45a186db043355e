"""The classification metrics of validation and test, from torchmetrics: binary or k-class; and one split's
evaluation."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import (BinaryAccuracy, BinaryAUROC, BinaryF1Score, BinaryPrecision,
                                         BinaryRecall, MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score,
                                         MulticlassPrecision, MulticlassRecall)

from neuron_torch.data.streaming import StreamedSplit
from neuron_torch.nn import layers


# AUROC over a streamed split: this many probability thresholds, a fixed-size state however many rows there are
# (exact AUROC keeps every prediction of the split until the end)
STREAMED_AUROC_THRESHOLDS = 1001


def classification_metrics(n_classes: int, thresholds: int | None = None) -> MetricCollection:
    """Accuracy, precision, recall, F1 and AUROC under the same names for two classes and for k.

    Two classes: of label 1, from its probability (m,). k classes: accuracy over all rows, macro-averaged
    precision, recall and F1, and one-vs-rest AUROC averaged over the classes, from the probabilities (m, k)
    and the class indices (m,). ``thresholds`` bins AUROC's probabilities (for splits too large to keep);
    None keeps them all, for the exact value.
    """
    if n_classes == 2:
        return MetricCollection({"accuracy": BinaryAccuracy(), "precision": BinaryPrecision(),
                                 "recall": BinaryRecall(), "f1": BinaryF1Score(),
                                 "auroc": BinaryAUROC(thresholds=thresholds)})
    k = n_classes
    return MetricCollection({"accuracy": MulticlassAccuracy(k, average="micro"),
                             "precision": MulticlassPrecision(k, average="macro"),
                             "recall": MulticlassRecall(k, average="macro"),
                             "f1": MulticlassF1Score(k, average="macro"),
                             "auroc": MulticlassAUROC(k, average="macro", thresholds=thresholds)})


def evaluate(net, batch, metrics: MetricCollection) -> Tensor:
    """The loss of ``net`` on a split, and its predictions added to ``metrics``.

    Parameters
    ----------
    net : HandBackprop
    batch : tuple of Tensor, or StreamedSplit
        A loaded split, ``(X, Y)`` or ``(X, Y, W)``, as one batch; or a streamed one, read chunk by chunk.
    metrics : MetricCollection
        From :func:`classification_metrics`, updated with every row.

    Returns
    -------
    Tensor, shape ()
        The mean cross-entropy over every row (weighted by ``W`` where given), without the L2 penalty.
    """
    head = layers.OUTPUTS[net.output]
    loss_sum, total = 0.0, 0.0
    for X, Y, *weight in (batch if isinstance(batch, StreamedSplit) else [batch]):
        Z = net.logits(X)  # (m, 1) or (m, k)
        m = weight[0].sum() if weight else X.shape[0]
        if weight:  # a chunk of weight 0 adds nothing to the mean (its own weighted mean is 0/0)
            loss_sum = loss_sum + torch.where(m > 0, head.loss(Z, Y, *weight) * m, 0.0)
        else:
            loss_sum = loss_sum + head.loss(Z, Y) * m
        total = total + m
        if Y.shape[1] == 1:
            metrics.update(head.forward(Z).squeeze(1), Y.squeeze(1).long())
        else:
            metrics.update(head.forward(Z), Y.argmax(1))
    return loss_sum / total
