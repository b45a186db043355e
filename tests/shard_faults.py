"""A Lightning callback that makes a shard disappear during training, for the streaming fault tests
(given on the command line as ``--trainer.callbacks+=shard_faults.RemoveShard``)."""

from __future__ import annotations

import os

import lightning as L


class RemoveShard(L.Callback):
    """Delete the file ``path`` once ``step`` updates are done."""

    def __init__(self, path: str, step: int = 1):
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and os.path.exists(self.path):
            os.remove(self.path)
