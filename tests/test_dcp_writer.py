"""DCP writes hash their bytes as they go (parallel/dcp_writer.py): the streamed digests equal a re-read of the
written files, every recorded offset is one of DCP's own, a corrupted chunk is still caught on load, and the
write-behind threads are gone when the save returns."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from parallel import dcp_format, dcp_writer
from parallel.dcp_format import (DCP_DIR, ItemCorrupted, TensorSlice, chunk_digests, load_tensors, save_tensors,
                                 saved_shapes)
from parallel.digests import bytes_digest, items_digest
from parallel.safe_load import load_dcp_metadata


def tensors() -> dict:
    """Every kind of item: large enough for the write-behind threads, small, scalar, a tensor-parallel slice."""
    g = torch.Generator().manual_seed(0)
    return {"model/big": torch.randn(1536, 2048, generator=g),  # 12 MB: crosses WRITE_BEHIND_BYTES
            "model/small": torch.randn(7, 3, generator=g), "optim/big/step": torch.tensor(3.0),
            "model/half": torch.randn(64, 33, generator=g).to(torch.bfloat16),
            "model/tp": TensorSlice(torch.randn(4, 6, generator=g), (8, 6), (4, 0))}


def streamed_save(tmp_path, monkeypatch):
    def no_reread(*args):
        raise AssertionError("save_tensors re-read its files instead of hashing them while writing")

    monkeypatch.setattr(dcp_format, "chunk_digests", no_reread)
    files, digests = save_tensors(tmp_path, tensors(), None)
    monkeypatch.undo()
    return files, digests


def test_streamed_digests_equal_a_reread_of_the_written_files(tmp_path, monkeypatch):
    files, digests = streamed_save(tmp_path, monkeypatch)
    data = [f for f in files if f.suffix == ".distcp"]
    assert [f.name for f in files] == ["__0_0.distcp", ".metadata"] and set(digests) == {"__0_0.distcp"}
    assert digests == chunk_digests(tmp_path / DCP_DIR, data)  # file digest and every chunk's, bytes-equal
    infos = load_dcp_metadata(tmp_path / DCP_DIR / ".metadata").storage_data.values()
    assert sorted(int(o) for o in digests["__0_0.distcp"][1]) == sorted(i.offset for i in infos)  # DCP's offsets
    assert not [t for t in threading.enumerate() if t.name in ("write-behind", "dcp-write-behind")]


def test_a_corrupted_chunk_is_still_detected_on_load(tmp_path, monkeypatch):
    files, digests = streamed_save(tmp_path, monkeypatch)
    items = {f"{DCP_DIR}/{name}": chunks for name, (_, chunks) in digests.items()}
    targets = {k: torch.empty(shape, dtype=torch.bfloat16 if k == "model/half" else torch.float32)
               for k, shape in saved_shapes(tmp_path).items()}
    load_tensors(tmp_path, targets, None, items)  # intact: loads
    assert torch.equal(targets["model/big"], tensors()["model/big"])
    big = next(i for i in load_dcp_metadata(tmp_path / DCP_DIR / ".metadata").storage_data.values()
               if i.length > 1 << 20)
    path = tmp_path / DCP_DIR / big.relative_path
    raw = bytearray(path.read_bytes())
    raw[big.offset + big.length // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ItemCorrupted, match=f"bytes {big.offset}\\+{big.length} do not match their checksum"):
        load_tensors(tmp_path, targets, None, items)


def test_items_that_are_not_one_segment_fall_back_to_reading_the_files(tmp_path, monkeypatch, caplog):
    """A DCP that wrote its items differently (no `tell()` around each) is detected, and the files re-read."""
    monkeypatch.setattr(dcp_writer.DigestingStream, "tell", lambda self: self.pos)
    with caplog.at_level(logging.WARNING):
        files, digests = save_tensors(tmp_path, tensors(), None)
    monkeypatch.undo()
    assert "is not one written segment" in caplog.text
    assert digests == chunk_digests(tmp_path / DCP_DIR, [f for f in files if f.suffix == ".distcp"])


def test_the_file_digest_derives_from_chunks_that_tile_the_file(tmp_path, monkeypatch):
    """Each byte is hashed once (per chunk); the file's digest is `items_digest` of its size and chunks, so a
    byte outside every item (appended here) is still covered: it becomes a chunk of its own."""
    files, digests = streamed_save(tmp_path, monkeypatch)
    digest, chunks = digests["__0_0.distcp"]
    path = tmp_path / DCP_DIR / "__0_0.distcp"
    size = path.stat().st_size
    assert digest == items_digest(size, chunks)
    with open(path, "ab") as f:
        f.write(b"tail")
    (grown, grown_chunks), = chunk_digests(tmp_path / DCP_DIR, [path]).values()
    assert grown_chunks == {**chunks, str(size): bytes_digest(b"tail")} and grown != digest
