"""Streamed full-batch updates against the read floor: the time of one update over a sharded Parquet table.

Writes ``--rows`` × 64 float32 shards (and a 0/1 label) itself, then times, on the same files in the page cache:
one plain pyarrow read of every shard (the floor: a streamed update must read the table once), the statistics
pass, one gradient-descent update of a float32 ``SingleNeuron`` (the full-batch loss and gradients through
:mod:`neuron_torch.data.streaming` under ``--budget``, then the rule's step), one Newton update (the Hessian summed
over the chunks too), and the same chunks iterated with no math (what the reader alone costs). With ``--cold``
the files are then dropped from the page cache (``posix_fadvise(DONTNEED)`` per shard, after an ``fsync``)
before each of ``--cold`` plain reads and as many updates, and the share of their pages still cached is
checked with ``mincore``. Reports seconds per update and the fraction of the read floor reached (floor ÷
update). JSON goes to ``benchmarks/results/``. ``python benchmarks/streaming.py --rows 2000000`` takes about a
minute here; the default 20M rows (5 GB) with ``--budget 1GB --cold 2`` about five.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
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

from neuron_torch.data.budget import chunk_rows, fits_in_memory, parse_memory_budget, read_reserve
from neuron_torch.data.chunks import read_chunks
from neuron_torch.nn.networks import SingleNeuron
from neuron_torch.nn.optim import make_update_rule
from neuron_torch.data.shards import open_shards
from neuron_torch.data.split import TRAIN, Split
from neuron_torch.data.streaming import StreamedSplit, feature_moments
from neuron_torch.nn.chunked import full_batch


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


def drop_from_page_cache(paths) -> None:
    """Ask the kernel to drop the files' pages from its page cache (written pages are flushed first: dirty
    pages are not dropped). Needs no privilege; whether it worked is what :func:`cached_share` says."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_share(paths) -> float | None:
    """Share of the files' pages in the page cache (Linux ``mincore`` over a read-only mapping); None where
    that cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                                  ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    page, cached, total = mmap.PAGESIZE, 0, 0
    for path in paths:
        size = os.path.getsize(path)
        pages = (size + page - 1) // page
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            vec = (ctypes.c_ubyte * pages)()
            ok = libc.mincore(addr, size, vec) == 0
            libc.munmap(addr, size)
            if not ok:
                return None
            cached += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
            total += pages
        finally:
            os.close(fd)
    return cached / total if total else None


def timed(fn, repeats: int, before=None) -> list[float]:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()  # off the clock
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
    parser.add_argument("--cold", type=int, default=0,
                        help="also time this many plain reads and updates with the files dropped from the page cache")
    parser.add_argument("--newton", type=int, default=1, help="timed Newton updates (0: none)")
    parser.add_argument("--dir", default=None,
                        help="where the shards go (default: a temporary folder, removed); shards already there "
                             "with --rows rows in all are reused, and kept")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's intra-op threads (default: torch's own, one per core); the reading thread "
                             "needs a core too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    n = args.features
    table_bytes = args.rows * n * 4
    budget = parse_memory_budget(args.budget) if args.budget else table_bytes // 5
    folder = Path(args.dir or tempfile.mkdtemp(prefix="neuron-torch-shards-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        existing = sorted(folder.glob("*.parquet"))
        if existing and open_shards(str(folder)).rows == args.rows:
            print(f"reusing the {len(existing)} shards in {folder}")
        else:
            start = time.perf_counter()
            write_shards(folder, args.rows, n, args.shard_rows, args.group_rows)
            print(f"wrote {args.rows:,} x {n} float32 ({table_bytes / 1e9:.2f} GB) in "
                  f"{time.perf_counter() - start:.1f} s to {folder}")
        shards = open_shards(str(folder))
        features = [f"x{j}" for j in range(n)]
        columns = features + ["label"]
        assert not fits_in_memory(shards.rows, n + 1, budget), "the budget would load this table: lower --budget"
        rows = chunk_rows(budget, n + 1, read_reserve(shards.largest_row_group_bytes))
        group_rows = max(g.rows for g in shards.row_groups)
        print(f"budget {budget / 2**20:.0f} MiB: chunks of up to {rows:,} rows "
              f"(a chunk never spans row groups: {min(rows, group_rows):,} here)")

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
        gd = make_update_rule("gd", net.parameters(), 1.0)
        newton = make_update_rule("newton", net.parameters(), 1.0)

        @torch.no_grad()
        def update(rule=gd):  # one update as the training step runs it: the streamed pass, then the rule's step
            bp = full_batch(net, stream, hessian=rule is newton)
            for name, p in net.named_parameters():
                p.grad = bp.gradients[name]
            rule.step() if rule is gd else rule.step(hessian=bp.hessian)

        updates = timed(update, args.passes)
        newton_updates = timed(lambda: update(newton), args.newton) if args.newton else []
        reader_only = timed(lambda: [None for _ in stream], args.passes)  # the same chunks, no compute

        paths = shards.paths
        cold_floor, cold_updates, cached_after_drop = [], [], []

        def drop():
            drop_from_page_cache(paths)
            cached_after_drop.append(cached_share(paths))

        if args.cold:
            cold_floor = timed(plain_read, args.cold, before=drop)
            cold_updates = timed(update, args.cold, before=drop)
            plain_read()  # back into the page cache for whoever runs next

        best_floor, best_update = min(floor), min(updates)
        result = {
            "rows": args.rows, "features": n, "table_gb": table_bytes / 1e9, "budget_mib": budget / 2**20,
            "chunk_rows": rows, "chunk_rows_read": min(rows, group_rows), "shards": len(paths),
            "row_group_rows": group_rows, "file_gb": sum(os.path.getsize(p) for p in paths) / 1e9,
            "plain_read_s": floor, "moments_pass_s": moment_times, "gd_update_s": updates,
            "newton_update_s": newton_updates, "reader_only_s": reader_only,
            "fraction_of_floor": best_floor / best_update,
            "cold_plain_read_s": cold_floor, "cold_gd_update_s": cold_updates,
            "cached_share_after_drop": cached_after_drop,
            "cold_fraction_of_floor": min(cold_floor) / min(cold_updates) if args.cold else None,
        }
        print(f"plain pyarrow read       {best_floor:.3f} s  (median {statistics.median(floor):.3f})")
        print(f"statistics pass (check)  {moment_times[0]:.3f} s")
        print(f"streamed update, gd      {best_update:.3f} s  (median {statistics.median(updates):.3f})")
        if newton_updates:
            print(f"streamed update, newton  {min(newton_updates):.3f} s")
        print(f"the same chunks, no math {min(reader_only):.3f} s  (median {statistics.median(reader_only):.3f})")
        print(f"fraction of the read floor reached: {best_floor / best_update:.2f}")
        if args.cold:
            print(f"from disk: plain read {min(cold_floor):.3f} s, gd update {min(cold_updates):.3f} s, fraction "
                  f"{min(cold_floor) / min(cold_updates):.2f}; share of pages cached after each drop: "
                  + ", ".join("?" if c is None else f"{c:.3f}" for c in cached_after_drop))
    finally:
        if args.dir is None:  # shards asked for in --dir are kept
            shutil.rmtree(folder, ignore_errors=True)

    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    meta = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "pyarrow": pa.__version__,
            "threads": torch.get_num_threads()}
    cold = "-cold" if args.cold else ""
    path = out / f"streaming-{args.rows}-{budget >> 20}MiB{cold}-{meta['threads']}threads-{meta['date']}.json"
    path.write_text(json.dumps({"meta": meta, "result": result}, indent=2))
    print(f"{meta}\nwritten: {path}")


if __name__ == "__main__":
    main()
