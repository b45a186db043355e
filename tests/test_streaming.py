"""Streaming a sharded Parquet table: shards and schema, the split, rank assignment, chunk reading, standardisation
statistics, and full-batch loss, gradients and Newton Hessian equal to the loaded table's in float64."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from neuron_torch.nn import layers
from neuron_torch.data.budget import (chunk_rows, default_memory_budget, fits_in_memory, parse_memory_budget, read_reserve)
from neuron_torch.data.chunks import Prefetch, read_chunks
from neuron_torch.nn.networks import DeepNetwork, SingleNeuron
from neuron_torch.data.shards import check_columns, open_shards, rank_pieces, resolve_paths
from neuron_torch.data.split import TEST, TRAIN, VAL, Split, split_of
from neuron_torch.data.streaming import StreamedSplit, feature_moments
from neuron_torch.nn.chunked import full_batch
from neuron_torch.errors import DataError

FEATURES = [f"f{j}" for j in range(5)]
# rows per row group, per shard: uneven on purpose, so chunks, row groups, shards and ranks never line up
LAYOUT = [[300, 300, 137], [500], [211, 400, 89, 250]]
BUDGET = 64 * 1024  # bytes: chunks of a few dozen rows, far below the ~100 KB table


def write_shards(folder: Path, layout=LAYOUT, seed: int = 0, n: int = len(FEATURES)) -> tuple[np.ndarray, np.ndarray]:
    """Shards ``part-<k>.parquet`` in ``folder``, row groups as ``layout`` says; returns all X (m, n), y (m,)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Xs, ys = [], []
    for k, groups in enumerate(layout):
        rows = sum(groups)
        X = rng.normal(3.0, 2.0, size=(rows, n)) * np.arange(1, n + 1) + 1e3  # offset: a naive variance would lose digits
        y = (X[:, 0] - X[:, 1] / 2 + rng.normal(0, 2, rows) > X[:, 0].mean() - X[:, 1].mean() / 2).astype(np.int64)
        table = pa.table({**{f"f{j}": X[:, j] for j in range(n)}, "label": y})
        writer = pq.ParquetWriter(folder / f"part-{k}.parquet", table.schema)
        lo = 0
        for size in groups:  # one write_table per row group: exactly the layout asked for
            writer.write_table(table.slice(lo, size))
            lo += size
        writer.close()
        Xs.append(X)
        ys.append(y)
    return np.concatenate(Xs), np.concatenate(ys)


def binary(labels: np.ndarray) -> np.ndarray:
    return (labels == 1).astype(np.float64)[:, None]


@pytest.fixture
def table(tmp_path):
    X, y = write_shards(tmp_path / "t")
    return tmp_path / "t", X, y


# --- shards and schema -------------------------------------------------------------------------------------------


def test_path_as_file_folder_or_glob(table):
    folder, X, _ = table
    files = sorted(str(p) for p in folder.glob("*.parquet"))
    assert resolve_paths(str(folder)) == files
    assert resolve_paths(str(folder / "part-*.parquet")) == files
    assert resolve_paths(files[1]) == [files[1]]
    shards = open_shards(str(folder))
    assert shards.rows == len(X) == sum(map(sum, LAYOUT))
    assert [g.rows for g in shards.row_groups] == [r for groups in LAYOUT for r in groups]
    assert [g.start for g in shards.row_groups] == list(np.cumsum([0] + [r for g in LAYOUT for r in g])[:-1])
    assert open_shards(files[1]).rows == 500


@pytest.mark.parametrize("path, fragment", [("nowhere", "file not found"), ("*.nothing", "no file matches")])
def test_missing_source(tmp_path, path, fragment):
    with pytest.raises(DataError, match=fragment):
        open_shards(str(tmp_path / path))


def one_line(err: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_schema_mismatch_names_shard_and_column(table):
    folder, _, _ = table
    bad = folder / "part-9.parquet"
    pq.write_table(pa.table({**{f"f{j}": [1.0] for j in range(5) if j != 3}, "label": [1]}), bad)
    with pytest.raises(DataError) as err:
        open_shards(str(folder))
    one_line(err, "part-9.parquet", "'f3'", "part-0.parquet")

    pq.write_table(pa.table({**{f"f{j}": [1.0] for j in range(5)}, "label": ["yes"]}), bad)
    with pytest.raises(DataError) as err:
        open_shards(str(folder))
    one_line(err, "part-9.parquet", "'label'", "string", "int64")

    pq.write_table(pa.table({**{f"f{j}": [1.0] for j in range(5)}, "label": [1], "extra": [2.0]}), bad)
    with pytest.raises(DataError) as err:
        open_shards(str(folder))
    one_line(err, "part-9.parquet", "'extra'")

    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError) as err:
        open_shards(str(folder))
    one_line(err, "part-9.parquet", "cannot be read as parquet")


def test_columns_checked(table):
    shards = open_shards(str(table[0]))
    check_columns(shards, FEATURES, ["label"])
    with pytest.raises(DataError) as err:
        check_columns(shards, FEATURES + ["f7"], ["label"])
    one_line(err, "part-0.parquet", "'f7'")


# --- the memory budget ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given, expected", [("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5G", 3 * 2**29),
                                             ("64 kB", 64_000), (4096, 4096), ("100", 100)])
def test_memory_budget_parsed(given, expected):
    assert parse_memory_budget(given) == expected


@pytest.mark.parametrize("given", ["lots", "2 parsecs", "-1GB", 0, True, ""])
def test_memory_budget_refused(given):
    with pytest.raises(DataError, match="data.memory_budget"):
        parse_memory_budget(given)


def test_budget_decides_load_or_stream():
    assert parse_memory_budget(None) == default_memory_budget() > 0
    assert fits_in_memory(1000, 10, 4 * 1000 * 10 * 8)
    assert not fits_in_memory(1001, 10, 4 * 1000 * 10 * 8)
    rows = chunk_rows(BUDGET, 6)
    assert 1 <= rows < 1000  # this test's tables are streamed in many chunks
    assert chunk_rows(2, 6) == 1 and chunk_rows(10**15, 6) == 1 << 20
    assert chunk_rows(10**6, 6, reserve=10**6 - 10**5) == chunk_rows(10**5, 6)
    with pytest.raises(DataError, match="row group"):
        chunk_rows(BUDGET, 6, reserve=read_reserve(BUDGET))


# --- the split -------------------------------------------------------------------------------------------------------


def test_split_is_a_function_of_index_and_seed():
    index = np.arange(200_000)
    part = split_of(index, 7, 0.2, 0.1)
    assert np.array_equal(part[123:4567], split_of(index[123:4567], 7, 0.2, 0.1))  # any slice, same parts
    assert np.array_equal(part[::-1], split_of(index[::-1], 7, 0.2, 0.1))
    shares = np.bincount(part, minlength=3) / len(index)
    sigma = np.sqrt(0.2 * 0.8 / len(index))
    assert abs(shares[VAL] - 0.2) < 5 * sigma and abs(shares[TEST] - 0.1) < 5 * sigma
    other = split_of(index, 8, 0.2, 0.1)
    assert 0.25 < (other != part).mean() < 0.6  # another seed: unrelated, not shifted, draws
    assert (split_of(index, 7, 0.0, 0.0) == TRAIN).all()
    assert not (split_of(index, 7, 0.0, 0.3) == VAL).any()
    assert Split(7, 0.2, 0.1).counts(len(index)) == {"train": int((part == 0).sum()), "val": int((part == 1).sum()),
                                                     "test": int((part == 2).sum())}


def test_streamed_split_equals_loaded_split(table):
    folder, X, _ = table
    shards, split = open_shards(str(folder)), Split(seed=3, val_fraction=0.25, test_fraction=0.15)
    loaded = split.of(np.arange(len(X)))
    for part in (TRAIN, VAL, TEST):
        with read_chunks(shards, FEATURES, chunk_rows(BUDGET, 6), label="label", split=split, part=part) as chunks:
            got = list(chunks)
        rows = np.flatnonzero(loaded == part)
        assert np.array_equal(np.concatenate([c.index for c in got]), rows)
        assert np.array_equal(np.concatenate([c.X for c in got]), X[rows])
        assert len(got) > 5


# --- data-parallel ranks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 5, 16])
def test_ranks_cover_every_row_once(table, world):
    folder, X, _ = table
    shards = open_shards(str(folder))
    seen, sizes = [], []
    for rank in range(world):
        pieces = rank_pieces(shards, rank, world)
        with read_chunks(shards, FEATURES, 97, pieces=pieces) as chunks:
            index = np.concatenate([c.index for c in chunks])
        assert np.array_equal(np.concatenate([c.X for c in read_chunks(shards, FEATURES, 97, pieces=pieces)]),
                              X[index])
        seen.append(index)
        sizes.append(len(index))
    assert np.array_equal(np.concatenate(seen), np.arange(len(X)))  # each row once, in global order
    assert max(sizes) - min(sizes) <= 1


# --- statistics -------------------------------------------------------------------------------------------------------


def test_moments_equal_numpy_on_train_rows(table):
    folder, X, _ = table
    shards, split = open_shards(str(folder)), Split(seed=1)
    with read_chunks(shards, FEATURES, chunk_rows(BUDGET, 6), split=split, part=TRAIN, check=True) as chunks:
        moments = feature_moments(chunks)
    train = X[split.of(np.arange(len(X))) == TRAIN]
    assert moments.rows == len(train)
    np.testing.assert_allclose(moments.mean, train.mean(0), rtol=1e-12, atol=0)
    np.testing.assert_allclose(moments.std, train.std(0), rtol=1e-12, atol=0)


# --- full-batch passes ------------------------------------------------------------------------------------------------


def loaded_train(X, y, split):
    """The training rows standardised as a loaded table is: numpy statistics of the train split."""
    rows = split.of(np.arange(len(X))) == TRAIN
    Xt = X[rows]
    mean, std = Xt.mean(0), Xt.std(0)
    return torch.from_numpy((Xt - mean) / std), torch.from_numpy(binary(y[rows])), mean, std


def streamed_train(folder, split, mean, std, pieces=None):
    shards = open_shards(str(folder))
    return StreamedSplit(shards, FEATURES, "label", binary, chunk_rows(BUDGET, 6), split, TRAIN, mean, std, pieces)


def assert_same_pass(streamed, loaded, tol=1e-10):
    torch.testing.assert_close(streamed.loss, loaded.loss, rtol=tol, atol=tol)
    assert list(streamed.gradients) == list(loaded.gradients)
    for name in loaded.gradients:
        torch.testing.assert_close(streamed.gradients[name], loaded.gradients[name], rtol=tol, atol=tol)


def make_networks():
    torch.manual_seed(0)
    neuron = SingleNeuron(len(FEATURES), init="normal", l2=0.3).double()
    deep = DeepNetwork(len(FEATURES), (4, 3), activation="relu", l2=0.05).double()
    return {"neuron": neuron, "neuron-reference": SingleNeuron(len(FEATURES), "normal", 0.3, fused=False).double(),
            "deep": deep}


@pytest.mark.parametrize("name", ["neuron", "neuron-reference", "deep"])
def test_streamed_pass_equals_loaded(table, name):
    folder, X, y = table
    split = Split(seed=5)
    Xt, Yt, mean, std = loaded_train(X, y, split)
    net = make_networks()[name]
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)
    streamed = full_batch(net, streamed_train(folder, split, mean, std))
    loaded = net.forward_backward(Xt, Yt)
    assert streamed.rows == len(Xt)
    assert net.l2 > 0  # put back after the pass
    assert_same_pass(streamed, loaded)
    for Z_max, Z in zip(streamed.Z, loaded.Z):  # what the dead-unit count needs: each unit's largest Z
        torch.testing.assert_close(Z_max, Z.amax(0, keepdim=True), rtol=1e-12, atol=1e-12)
    if name == "deep":
        assert len(streamed.Z) == 3


def test_streamed_newton_hessian_equals_loaded(table):
    folder, X, y = table
    split = Split(seed=5)
    Xt, Yt, mean, std = loaded_train(X, y, split)
    net = make_networks()["neuron"]
    streamed = full_batch(net, streamed_train(folder, split, mean, std), hessian=True)
    w, b = net.linear.weight, net.linear.bias
    H = layers.l2_hessian(layers.bce_hessian(Xt, w, b), net.l2)
    torch.testing.assert_close(streamed.hessian, H, rtol=1e-10, atol=1e-12)
    assert_same_pass(streamed, net.forward_backward(Xt, Yt))
    with pytest.raises(ValueError, match="one linear layer"):
        full_batch(make_networks()["deep"], [], hessian=True)


def test_ranks_combined_equal_one_process(table):
    """Σ_r m_r·g_r / Σ_r m_r over ranks' streamed passes, as the module all-reduces them, is the whole pass."""
    folder, X, y = table
    split = Split(seed=2)
    Xt, Yt, mean, std = loaded_train(X, y, split)
    net = make_networks()["neuron"]
    shards = open_shards(str(folder))
    passes = [full_batch(net, streamed_train(folder, split, mean, std, rank_pieces(shards, r, 3))) for r in range(3)]
    m = sum(p.rows for p in passes)
    assert m == len(Xt)
    loaded = net.forward_backward(Xt, Yt)
    torch.testing.assert_close(sum(p.loss * p.rows for p in passes) / m, loaded.loss, rtol=1e-10, atol=1e-10)
    for name, g in loaded.gradients.items():
        torch.testing.assert_close(sum(p.gradients[name] * p.rows for p in passes) / m, g, rtol=1e-10, atol=1e-10)


def test_no_rows_leaves_the_l2_terms(table):
    net = make_networks()["neuron"]
    out = full_batch(net, [], hessian=True)
    assert out.rows == 0
    torch.testing.assert_close(out.loss, layers.l2_penalty([net.linear.weight], net.l2))
    torch.testing.assert_close(out.gradients["linear.weight"], net.l2 * net.linear.weight)
    assert float(out.gradients["linear.bias"]) == 0 and out.hessian.shape == (len(FEATURES) + 1,) * 2


def test_float32_placement(table):
    folder, X, y = table
    split = Split(seed=5)
    Xt, Yt, mean, std = loaded_train(X, y, split)
    streamed = streamed_train(folder, split, mean, std)
    streamed.dtype = torch.float32
    net = SingleNeuron(len(FEATURES), init="normal")
    out = full_batch(net, streamed)
    assert out.loss.dtype == torch.float32
    assert_same_pass(out, net.forward_backward(Xt.float(), Yt.float()), tol=1e-5)


# --- faults -------------------------------------------------------------------------------------------------------------


def test_missing_shard_mid_run(table):
    folder, _, _ = table
    shards = open_shards(str(folder))
    os.remove(folder / "part-1.parquet")
    with pytest.raises(DataError) as err, read_chunks(shards, FEATURES, 50) as chunks:
        list(chunks)
    one_line(err, "part-1.parquet", "cannot be read any more")


def test_corrupt_shard_mid_run(table):
    folder, _, _ = table
    shards = open_shards(str(folder))
    shard = folder / "part-2.parquet"
    data = bytearray(shard.read_bytes())
    data[4:4000] = bytes(3996)  # the data pages zeroed, the footer left alone
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError) as err, read_chunks(shards, FEATURES, 50) as chunks:
        list(chunks)
    one_line(err, "part-2.parquet", "changed since the table was opened")
    os.utime(shard, ns=shards.stamps[str(shard)][1:] * 2)  # the same size and time: only decoding can tell
    with pytest.raises(DataError) as err, read_chunks(shards, FEATURES, 50) as chunks:
        list(chunks)
    one_line(err, "part-2.parquet", "cannot be read")


def test_bad_value_names_shard_column_and_row(tmp_path):
    folder = tmp_path / "nan"
    folder.mkdir()
    pq.write_table(pa.table({"f0": [1.0, 2.0], "label": [0, 1]}), folder / "a.parquet")
    pq.write_table(pa.table({"f0": [1.0, 2.0, np.inf], "label": [0, 1, 1]}), folder / "b.parquet")
    pq.write_table(pa.table({"f0": pa.array([1.0, None]), "label": [0, 1]}), folder / "c.parquet")
    shards = open_shards(str(folder))
    with pytest.raises(DataError) as err, read_chunks(shards, ["f0"], 2, label="label", check=True) as chunks:
        list(chunks)
    one_line(err, "b.parquet", "'f0'", "row 3", "non-finite")
    pieces = [p for p in shards.pieces() if p.path.endswith("c.parquet")]
    with pytest.raises(DataError) as err, read_chunks(shards, ["f0"], 2, pieces=pieces, check=True) as chunks:
        list(chunks)
    one_line(err, "c.parquet", "'f0'", "row 2", "missing value")


# --- the reading thread -------------------------------------------------------------------------------------------------


def test_prefetch_stops_when_the_consumer_stops_early(table):
    shards = open_shards(str(table[0]))
    before = set(threading.enumerate())
    reader = read_chunks(shards, FEATURES, 10)
    with reader:
        first = next(iter(reader))
        assert len(first.index) == 10
    assert not reader.alive
    assert set(threading.enumerate()) - before == set()

    # a StreamedSplit's generator, left after one chunk, ends its thread when it is closed
    stream = iter(StreamedSplit(shards, FEATURES, "label", binary, 10, Split()))
    next(stream)
    stream.close()
    assert [t for t in threading.enumerate() if t.name == "neuron-torch-prefetch"] == []


def test_prefetch_hands_the_producer_error_to_the_consumer():
    def produce():
        yield 1
        raise DataError("shard.parquet: broken")

    with Prefetch(produce) as items, pytest.raises(DataError, match="broken"):
        assert next(iter(items)) == 1
        list(items)
    assert not items.alive


# --- memory -------------------------------------------------------------------------------------------------------------

PEAK = textwrap.dedent("""
    import sys
    import numpy as np, torch
    from neuron_torch.data.budget import chunk_rows, read_reserve
    from neuron_torch.nn.networks import SingleNeuron
    from neuron_torch.data.shards import open_shards
    from neuron_torch.data.split import Split
    from neuron_torch.data.streaming import StreamedSplit
    from neuron_torch.nn.chunked import full_batch

    def status(key):  # kB
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

    folder, budget, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    features = [f"f{j}" for j in range(n)]
    shards = open_shards(folder)
    split = Split(seed=0)
    net = SingleNeuron(n).double()
    binary = lambda y: (y == 1)[:, None].astype(float)
    reserve = read_reserve(shards.largest_row_group_bytes)
    stream = StreamedSplit(shards, features, "label", binary, chunk_rows(budget, n + 1, reserve), split)
    full_batch(net, StreamedSplit(shards, features, "label", binary, 16, split, pieces=shards.pieces(0, 64)))
    # the peak so far is the imports': reset it (Linux >= 4.0), so the peak read below is the streaming's own
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    base = status("VmRSS")
    for _ in range(3):
        out = full_batch(net, stream)
    print(int(out.rows), (status("VmHWM") - base) * 1024)
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's peak-RSS reset")
def test_peak_memory_stays_within_the_budget(tmp_path):
    """A table 6× the budget streamed three times: the peak RSS grows by less than the budget plus a slack for
    the allocators' arenas (pyarrow's and the reading thread's). The row groups (2,000 rows, 0.5 MB) are small
    next to the budget, as :func:`neuron_torch.data.budget.chunk_rows` requires."""
    n, budget, slack = 32, 4 << 20, 8 << 20
    X, _ = write_shards(tmp_path / "big", layout=[[2_000] * 10] * 5, n=n)  # 100k × 32 float64: 25.6 MB
    table_bytes = X.nbytes
    del X
    assert table_bytes > 6 * budget
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "big"), str(budget), str(n)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    rows, growth = map(int, out.stdout.split())
    assert rows > 50_000
    assert growth < budget + slack, f"peak RSS grew by {growth / 2**20:.1f} MiB"
