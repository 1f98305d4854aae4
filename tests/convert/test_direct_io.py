"""Sequential direct-I/O files and the front-to-back safetensors writer built on them."""

import errno
import fcntl
import os

import numpy as np
import pytest

from hephaestus_jax.convert import direct_io
from hephaestus_jax.convert.safetensors_io import ConversionError, SafetensorsReader, ShardedSafetensorsWriter


@pytest.fixture
def small_staging(monkeypatch):
    """A staging buffer of two alignment units, so a few KiB exercise every flush path."""
    monkeypatch.setattr(direct_io, "STAGING_BYTES", 2 * direct_io.ALIGNMENT)


def _write_in_pieces(path, data, rng, direct=True):
    f = direct_io.SequentialFile(str(path), direct=direct)
    position = 0
    while position < data.size:
        step = int(rng.integers(1, 3 * direct_io.ALIGNMENT))
        f.append(data[position:position + step])
        position += step
    f.close()
    return f


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 8192, 8193, 50_001])
@pytest.mark.parametrize("direct", [True, False])
def test_sequential_file_holds_exactly_the_bytes_appended(tmp_path, small_staging, size, direct):
    rng = np.random.default_rng(size)
    data = rng.integers(0, 256, size, dtype=np.uint8)
    _write_in_pieces(tmp_path / "f.bin", data, rng, direct)
    assert (tmp_path / "f.bin").read_bytes() == data.tobytes()


def test_direct_writes_refused_by_the_filesystem_fall_back_to_buffered(tmp_path, small_staging, monkeypatch):
    """Some filesystems accept O_DIRECT at open and refuse the write itself: the data must still land."""
    real_pwrite = os.pwrite

    def pwrite_refusing_direct(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(direct_io.os, "pwrite", pwrite_refusing_direct)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 20_000, dtype=np.uint8)
    f = _write_in_pieces(tmp_path / "f.bin", data, rng)
    assert not f.direct
    assert (tmp_path / "f.bin").read_bytes() == data.tobytes()


def test_sequential_file_never_overwrites(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        direct_io.SequentialFile(str(tmp_path / "f.bin"))
    assert (tmp_path / "f.bin").read_bytes() == b"keep"


def test_sharded_writer_round_trips_through_the_reader(tmp_path, small_staging):
    rng = np.random.default_rng(1)
    tensors = {f"t{i}": rng.standard_normal((3, 100 + i)).astype(np.float32) for i in range(6)}
    plan = [(name, t.shape, "float32") for name, t in tensors.items()]
    writer = ShardedSafetensorsWriter(str(tmp_path), plan, max_shard_bytes=4000)
    for name, tensor in tensors.items():
        flat = tensor.reshape(-1)
        writer.write(name, 0, flat[:7])
        writer.write(name, 7, flat[7:])
    files = writer.finish()
    assert len(files) > 2 and files[-1] == "model.safetensors.index.json"
    reader = SafetensorsReader(str(tmp_path))
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(reader.read(name), tensor)


def test_sharded_writer_names_an_out_of_order_write(tmp_path):
    plan = [("a", (4,), "float32"), ("b", (4,), "float32")]
    writer = ShardedSafetensorsWriter(str(tmp_path), plan, max_shard_bytes=10**9)
    with pytest.raises(ConversionError, match=r"'b' from element 0, but the export plan expects 'a' from element 0"):
        writer.write("b", 0, np.zeros(4, np.float32))
    writer.write("a", 0, np.zeros(2, np.float32))
    with pytest.raises(ConversionError, match=r"expects 'a' from element 2"):
        writer.write("a", 3, np.zeros(1, np.float32))
    with pytest.raises(ConversionError, match=r"export incomplete: 2 tensors"):
        writer.finish()
