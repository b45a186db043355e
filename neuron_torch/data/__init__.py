"""The data: tables and their checks, labels and weights, the split, the memory budget, Parquet shards read in
chunks, the streamed table, and the LightningDataModule that hands them to training with their summary."""
