"""Streamed full-batch passes against the read floor: the time of one pass over a sharded Parquet table.

Writes ``--rows`` × 64 float32 shards (and a 0/1 label) itself, then times, on the same files in the page cache:
one plain pyarrow read of every shard (the floor: a streamed update must read the table once), the statistics
pass, the full-batch loss and gradients of a float32 ``SingleNeuron`` through :mod:`neuron_torch.streaming`
under ``--budget``, and the same chunks iterated with no math (what the reader alone costs). Reports seconds per pass and the fraction of the read floor reached (floor ÷ pass). JSON goes
to ``benchmarks/results/``. ``python benchmarks/streaming.py --rows 2000000`` takes about a minute here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from neuron_torch.budget import chunk_rows, fits_in_memory, parse_memory_budget, read_reserve
from neuron_torch.chunks import read_chunks
from neuron_torch.networks import SingleNeuron
from neuron_torch.shards import open_shards
from neuron_torch.split import TRAIN, Split
from neuron_torch.streaming import StreamedSplit, feature_moments, full_batch


def write_shards(folder: Path, rows: int, n: int, shard_rows: int, group_rows: int) -> None:
    """``rows`` × ``n`` float32 features, N(0, 1), and a label from a noisy linear rule, in shards of
    ``shard_rows`` rows and row groups of ``group_rows``; written a row group at a time."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=n).astype(np.float32)
    names = [f"x{j}" for j in range(n)]
    for k, lo in enumerate(range(0, rows, shard_rows)):
        size = min(shard_rows, rows - lo)
        writer = None
        for g in range(0, size, group_rows):
            m = min(group_rows, size - g)
            X = rng.standard_normal((m, n), dtype=np.float32)
            y = (X @ w + rng.standard_normal(m, dtype=np.float32) * 2 > 0).astype(np.int8)
            table = pa.table({**{name: X[:, j] for j, name in enumerate(names)}, "label": y})
            writer = writer or pq.ParquetWriter(folder / f"part-{k:05d}.parquet", table.schema)
            writer.write_table(table, row_group_size=group_rows)
        writer.close()


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000_000, help="table rows (default 20M: 5 GB of float32)")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--shard-rows", type=int, default=1_000_000)
    parser.add_argument("--group-rows", type=int, default=1 << 16, help="rows per Parquet row group")
    parser.add_argument("--budget", default=None, help="memory budget (default: a fifth of the table's size)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes of each kind")
    parser.add_argument("--dir", default=None, help="where the shards go (default: a temporary folder, removed)")
    args = parser.parse_args()

    n = args.features
    table_bytes = args.rows * n * 4
    budget = parse_memory_budget(args.budget) if args.budget else table_bytes // 5
    folder = Path(args.dir or tempfile.mkdtemp(prefix="neuron-torch-shards-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        write_shards(folder, args.rows, n, args.shard_rows, args.group_rows)
        print(f"wrote {args.rows:,} x {n} float32 ({table_bytes / 1e9:.2f} GB) in "
              f"{time.perf_counter() - start:.1f} s to {folder}")
        shards = open_shards(str(folder))
        features = [f"x{j}" for j in range(n)]
        columns = features + ["label"]
        assert not fits_in_memory(shards.rows, n + 1, budget), "the budget would load this table: lower --budget"
        rows = chunk_rows(budget, n + 1, read_reserve(shards.largest_row_group_bytes))
        print(f"budget {budget / 2**20:.0f} MiB: streamed in chunks of {rows:,} rows")

        def plain_read():  # the floor: every shard read by pyarrow (threaded), the columns the pass reads
            for path in shards.paths:
                pq.read_table(path, columns=columns)

        plain_read()  # the files into the page cache
        floor = timed(plain_read, args.passes)

        split = Split(seed=0, val_fraction=0.0, test_fraction=0.0)  # every row trains: the same rows as the floor

        def moments():
            with read_chunks(shards, features, rows, split=split, part=TRAIN, check=True) as chunks:
                return feature_moments(chunks)

        moment_times = timed(moments, 1)
        stats = moments()
        net = SingleNeuron(n)  # float32, the fused CPU kernel where it applies
        stream = StreamedSplit(shards, features, "label", lambda y: y[:, None].astype(np.float64), rows, split,
                               TRAIN, stats.mean, stats.std, dtype=torch.float32)
        passes = timed(lambda: full_batch(net, stream), args.passes)
        reader_only = timed(lambda: [None for _ in stream], args.passes)  # the same chunks, no compute

        best_floor, best_pass = min(floor), min(passes)
        result = {
            "rows": args.rows, "features": n, "table_gb": table_bytes / 1e9, "budget_mib": budget / 2**20,
            "chunk_rows": rows, "shards": len(shards.paths), "row_group_rows": args.group_rows,
            "plain_read_s": floor, "moments_pass_s": moment_times, "gradient_pass_s": passes,
            "reader_only_s": reader_only,
            "fraction_of_floor": best_floor / best_pass,
        }
        print(f"plain pyarrow read       {best_floor:.3f} s  (median {statistics.median(floor):.3f})")
        print(f"statistics pass (check)  {moment_times[0]:.3f} s")
        print(f"streamed gradient pass   {best_pass:.3f} s  (median {statistics.median(passes):.3f})")
        print(f"the same chunks, no math {min(reader_only):.3f} s  (median {statistics.median(reader_only):.3f})")
        print(f"fraction of the read floor reached: {best_floor / best_pass:.2f}")
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)

    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    meta = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "pyarrow": pa.__version__,
            "threads": torch.get_num_threads()}
    path = out / f"streaming-{args.rows}-{budget >> 20}MiB-{meta['date']}.json"
    path.write_text(json.dumps({"meta": meta, "result": result}, indent=2))
    print(f"{meta}\nwritten: {path}")


if __name__ == "__main__":
    main()
