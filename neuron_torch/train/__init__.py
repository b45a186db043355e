"""Training in Lightning: the LightningModule (hooks only), the update loop, the distributed sums, stopping,
progress, metrics and CUDA graphs."""
