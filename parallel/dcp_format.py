"""An engine's tensors (parameters, AdamW moments) as a torch.distributed.checkpoint (DCP) checkpoint: one
directory `dcp/` in a step, `__<rank>_0.distcp` per rank plus DCP's `.metadata`, keyed by *dense* parameter name
(`model/<name>`, `optim/<name>/<state>`) with each tensor's global shape.

A rank saves its local slices (a tensor-parallel slice is a chunk of the dense tensor at its offset along the
plan's `tp_split`); replicas (data-parallel copies, unsplit tensors on every tp rank) are written once (DCP's
dedup of identical chunks). A rank loads by asking for its own slices of the dense tensors: DCP reads only the
saved chunks that overlap them, so any layout resumes any other and a rank reads about its share of the bytes,
not the whole checkpoint. Slices are DCP `_Checkpointable`s (the protocol DTensor implements), so no device mesh
is needed and the same code runs on gloo and NCCL. Reads are `weights_only` (DCP's FileSystemReader).

Collectives (plan exchange) run over the group the caller passes: the checkpoint manager's own gloo group, so an
asynchronous save in a background thread never interleaves with training collectives.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.utils.serialization import config as serialization_config
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, StorageMeta,
                                                  TensorStorageMetadata)
from torch.distributed.checkpoint.planner import TensorProperties, TensorWriteData, WriteItem, WriteItemType

from common.parallel_plan import tp_split_dim
from parallel.dcp_writer import Digests, DigestingWriter
from parallel.digests import bytes_digest, items_digest
from parallel.safe_load import load_dcp_metadata, refusal_reason

DCP_DIR = "dcp"


class TensorSlice:
    """`local` is the chunk of a dense tensor of `global_shape` that starts at `offsets` (DCP's
    `_Checkpointable`: what DCP asks of a DTensor, without a mesh)."""

    def __init__(self, local: torch.Tensor, global_shape: tuple[int, ...], offsets: tuple[int, ...]):
        self.local, self.global_shape, self.offsets = local, torch.Size(global_shape), torch.Size(offsets)

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        chunk = ChunkStorageMetadata(offsets=self.offsets, sizes=self.local.size())
        return [WriteItem(index=MetadataIndex(fqn, self.offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=chunk, size=self.global_shape,
                                                      properties=TensorProperties.create_from_tensor(self.local)))]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=self.offsets, sizes=self.local.size())]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.local


class _SavePlanner(DefaultSavePlanner):
    """DCP's default planner; a `TensorSlice` resolves to its local tensor (DCP looks up only Tensors by chunk)."""

    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = self.state_dict[index.fqn]
        return obj.local if isinstance(obj, TensorSlice) else super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    """For a flat dict of tensors and `TensorSlice`s (DCP's set-up would replace objects it does not know with
    None while it materializes meta tensors; ours are real)."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        return obj.local if isinstance(obj, TensorSlice) else super().lookup_tensor(index)


def tp_slice(name: str, local: torch.Tensor, split: dict[str, int], tp: int, tp_rank: int) -> Any:
    """This rank's `local` tensor of dense parameter `name` (or one of its moments) as DCP sees it: a chunk at
    its tensor-parallel offset, or the whole (replicated) tensor."""
    dim = tp_split_dim(name, split)
    if dim is None or tp == 1 or local.dim() == 0:
        return local
    shape = list(local.shape)
    offsets = [0] * local.dim()
    offsets[dim], shape[dim] = tp_rank * local.shape[dim], local.shape[dim] * tp
    return TensorSlice(local, tuple(shape), tuple(offsets))


def dense_shape(value: Any) -> tuple[int, ...]:
    return tuple(value.global_shape if isinstance(value, TensorSlice) else value.shape)


def local_tensor(value: Any) -> torch.Tensor:
    return value.local if isinstance(value, TensorSlice) else value


def snapshot_slices(tensors: dict[str, Any]) -> dict[str, Any]:
    """CPU copies of every slice (training may change the originals while a background thread writes)."""
    def copy(v: Any) -> Any:
        if isinstance(v, TensorSlice):
            return TensorSlice(v.local.detach().to("cpu", copy=True), v.global_shape, v.offsets)
        return v.detach().to("cpu", copy=True)
    return {k: copy(v) for k, v in tensors.items()}


@contextlib.contextmanager
def _single_process_quiet(group) -> Iterator[None]:
    """DCP warns on every single-process save/load that it assumes one process: that is what group None means."""
    with warnings.catch_warnings():
        if group is None:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_tensors(step_tmp: Path, tensors: dict[str, Any], group) -> tuple[list[Path], Digests]:
    """Every rank of `group` calls this with its slices (group None: this process alone); returns the files
    this rank wrote (its `__<rank>_0.distcp`; the coordinator also `.metadata`) and its data files' digests
    ({file name: (file digest, {offset: chunk digest})}, hashed while written: parallel/dcp_writer.py). A failed
    write on any rank raises OSError naming the directory on every rank (DCP gathers the failures)."""
    directory = step_tmp / DCP_DIR
    rank = 0 if group is None else torch.distributed.get_rank(group)
    writer = DigestingWriter(directory, single_file_per_rank=True, sync_files=True, thread_count=1)
    try:
        # the zip CRC32 of every item would cost as much as the write; the chunk digests cover every byte
        with _single_process_quiet(group), serialization_config.patch({"save.compute_crc32": False}):
            dcp.save(tensors, storage_writer=writer, planner=_SavePlanner(), process_group=group,
                     no_dist=group is None)
    except CheckpointException as e:  # a BaseException: the checkpoint manager's handlers expect OSError
        errors = [err for err, _ in e.failures.values()]
        first = next((err for err in errors if isinstance(err, OSError)), errors[0] if errors else e)
        raise OSError(getattr(first, "errno", None), f"DCP save failed on ranks {sorted(e.failures)}: {first}",
                      str(directory)) from None
    mine = sorted(directory.glob(f"__{rank}_*.distcp"))
    digests = writer.digests
    if digests is None or set(digests) != {f.name for f in mine}:  # DCP wrote differently: read them back
        digests = chunk_digests(directory, mine)
    return mine + ([directory / ".metadata"] if rank == 0 else []), digests


class ItemCorrupted(ValueError):
    """A saved chunk's bytes do not match the digest its writer recorded."""


def chunk_digests(directory: Path, files: list[Path]) -> Digests:
    """{file name: (digest of the file, {byte offset: digest of the chunk there})} of `files` (this rank's DCP
    data files), in one sequential read of each: what `save_tensors` computes while writing (used when it could
    not, and by tests). Every saved item is a chunk; bytes outside them (none in DCP's layout today) are chunks
    of their own, so the chunks tile the file and its digest derives from theirs (`digests.items_digest`). A
    rank that later reads a chunk verifies exactly those bytes, and no rank has to read whole files."""
    by_file: dict[str, list] = {f.name: [] for f in files}
    for info in load_dcp_metadata(directory / ".metadata").storage_data.values():
        if info.relative_path in by_file:
            by_file[info.relative_path].append(info)
    out = {}
    for name, infos in by_file.items():
        chunks, pos = {}, 0
        with open(directory / name, "rb") as f:
            spans = [(i.offset, i.length) for i in sorted(infos, key=lambda i: i.offset)]
            size = f.seek(0, 2)
            f.seek(0)
            for offset, length in spans + [(size, 0)]:
                if offset > pos:  # bytes outside the items
                    chunks[str(pos)] = bytes_digest(f.read(offset - pos))
                if length:
                    chunks[str(offset)] = bytes_digest(f.read(length))
                pos = offset + length
        out[name] = items_digest(size, chunks), chunks
    return out


class CountingReader(dcp.FileSystemReader):
    """DCP's reader, counting the bytes of the saved chunks it reads (each is read whole, then narrowed) and
    checking each against its recorded digest (`items`: {file name: {offset: digest}})."""

    def __init__(self, path: Path, items: dict[str, dict[str, str]] | None = None):
        super().__init__(path)
        self.bytes_read, self.items = 0, items or {}

    def read_metadata(self, *args: Any, **kwargs: Any):
        """DCP's metadata through a restricted unpickler (DCP's reader uses `pickle.load`: a crafted file could
        run code)."""
        path = Path(self.path) / ".metadata"
        self.bytes_read += path.stat().st_size
        metadata = load_dcp_metadata(path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _slice_file(self, file, sinfo):
        self.bytes_read += sinfo.length
        want = self.items.get(sinfo.relative_path, {}).get(str(sinfo.offset))
        if want is None:
            return super()._slice_file(file, sinfo)
        file.seek(sinfo.offset)
        data = file.read(sinfo.length)
        if bytes_digest(data) != want:
            raise ItemCorrupted(f"{Path(self.path) / sinfo.relative_path}: bytes {sinfo.offset}+{sinfo.length} do "
                                "not match their checksum (corrupted or partially written)")
        return io.BytesIO(data)


def saved_shapes(step: Path) -> dict[str, tuple[int, ...]]:
    """Dense shape of every tensor a step's DCP checkpoint holds."""
    meta = CountingReader(step / DCP_DIR).read_metadata()
    return {k: tuple(v.size) for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def load_tensors(step: Path, targets: dict[str, Any], group, items: dict | None = None) -> int:
    """Fill `targets` (this rank's slices, preallocated) in place from a step's DCP checkpoint (every rank of
    `group` calls it; None: this process alone); returns the bytes this rank read. Raises ValueError naming the tensor when one is missing or has another dense shape."""
    saved = saved_shapes(step)
    for key, value in targets.items():
        if key not in saved:
            raise ValueError(f"{step / DCP_DIR}: no tensor {key!r} (saved by another model?)")
        if saved[key] != dense_shape(value):
            raise ValueError(f"{step / DCP_DIR}: {key} has shape {saved[key]}, this model needs {dense_shape(value)}")
    reader = CountingReader(step / DCP_DIR, {Path(k).name: v for k, v in (items or {}).items()})
    try:
        with _single_process_quiet(group):
            dcp.load(targets, storage_reader=reader, planner=_LoadPlanner(), process_group=group,
                     no_dist=group is None)
    except CheckpointException as e:  # a BaseException; e.g. an item that is not plain tensor data
        first = next(iter(e.failures.values()))[0] if e.failures else e
        if isinstance(first, ItemCorrupted):
            raise ItemCorrupted(str(first)) from None
        refused = "refused: " if isinstance(first, pickle.UnpicklingError) else ""
        raise ValueError(f"{step / DCP_DIR}: {refused}{refusal_reason(first)}") from None
    return reader.bytes_read


def read_all(step: Path, items: dict | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every saved tensor whose key starts with `prefix`, dense, in this process (consolidation, inspection)."""
    targets = {k: torch.empty(shape) for k, shape in saved_shapes(step).items() if k.startswith(prefix)}
    load_tensors(step, targets, None, items)
    return targets
