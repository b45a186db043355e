"""The classification metrics of validation and test, from torchmetrics: binary or k-class."""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import (BinaryAccuracy, BinaryAUROC, BinaryF1Score, BinaryPrecision,
                                         BinaryRecall, MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score,
                                         MulticlassPrecision, MulticlassRecall)


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
