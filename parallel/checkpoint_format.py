"""The training-checkpoint format, all of it (DESIGN §6): names, shards, metadata, commit, verified reads, the
layout-free slices that let any ZeRO-0 layout resume any other, and consolidation into one file. *When* to save
is the trainer's checkpoint manager (trainer/checkpointing.py); what an engine puts in a shard is the engine's.

`step-00001234/` holds one small shard per rank (`rank-00003.pt`: train state, loader, RNG, scheduler), the
engines' tensors as a torch.distributed.checkpoint directory `dcp/` (parallel/dcp_format.py: by dense parameter
name, any layout reads any other, each rank reading about its own share) and `metadata.json`, written last.
Format 2 (before 2026-12-04: tensors inside the rank shards, or DeepSpeed's own files) is still read.

A step directory is built under a temporary name, each rank fsyncs and hashes its own shard, `metadata.json`
(format, step, a digest per file with its algorithm, a digest per DCP chunk, config) is the commit marker, then
the directory is renamed into place and `latest` is updated. Resume picks the newest committed step, verifies
every checksum and falls back to the previous step when one is corrupted. Shards are loaded with
`torch.load(weights_only=True)`: no pickled code runs.

Layout-free slices: every rank saves its model and AdamW state *by parameter name* (the dense model's names,
tensor-parallel shards as slices along the plan's `tp_split`, saved in the metadata), so any other dp x pp x tp
layout can rebuild its own slices. Under layout (tp, pp, dp) the ranks with dp_rank 0 together hold every
parameter once (cp rank 0 under context parallelism); rank order is megatron-core's:
rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank)).
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.serialization import config as serialization_config

from safetensors import safe_open
from safetensors.torch import save

from common.atomic import atomic_write_bytes, atomic_write_stream, atomic_write_text
from common.parallel_plan import tp_split_dim
from parallel.digests import ALGORITHMS, DIGEST, ITEMS_DIGEST, LEGACY, HashingWriter, bytes_digest, file_digest
from parallel.safe_load import refusal_reason, verify_deepspeed_dir
from parallel.collectives import any_rank, broadcast_object, group_size, rank as process_rank
from parallel.dcp_format import ItemCorrupted, read_all, save_tensors
from parallel.topology import rank_of

log = logging.getLogger(__name__)
FORMAT, FORMAT_VERSION = "videoar-checkpoint", 3
READABLE_VERSIONS = (2, 3)  # 2: tensors in the rank shards (ZeRO-0) or DeepSpeed's own files (ZeRO 1-3)
STEP_DIR = re.compile(r"^step-(\d{8})$")
DIGEST_SUFFIX = ".digest"  # a rank's digest of its shard (parallel/digests.py DIGEST), beside it until the commit
SINGLE = {"tp": 1, "pp": 1, "dp": 1, "zero_stage": 0}  # the parallel layout of one process
MOMENTS = ("exp_avg", "exp_avg_sq")  # optimizer state split like its parameter
CONSOLIDATED, CONSOLIDATED_VERSION = "videoar-model", "1"


def shard_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def shard_rank(name: str) -> int:
    return int(name.removeprefix("rank-").removesuffix(".pt"))


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def begin_checkpoint(root: str | Path, step: int) -> Path:
    """A fresh temporary directory for step `step` (one process calls this; the others wait)."""
    tmp = Path(root) / f".tmp-{step_dir(root, step).name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_rank_shard(tmp: Path, name: str, state: dict[str, Any]) -> str:
    """One shard (e.g. `rank-00003.pt`), fsynced; every rank writes its own, in parallel. torch.save streams
    into the file through a hashing writer (serialize, hash and write in one pass). The digest goes to
    `<name>.digest` after the shard is durable, so its presence means the shard is complete, and the commit need
    not read the shard back (the digest file itself is not fsynced: it lives only until the commit copies it into
    metadata.json, which is; a crash before that leaves an uncommitted step, discarded). Returns the digest."""
    writer: list[HashingWriter] = []

    def write(f) -> None:
        writer.append(HashingWriter(f))
        try:
            # the zip's own CRC32 of every record would cost ~40% of the save; the digest covers every byte
            with serialization_config.patch({"save.compute_crc32": False}):
                torch.save(state, writer[0])
        except RuntimeError:
            if writer[0].error is not None:  # the disk's error (e.g. ENOSPC), not torch's wrapper of it
                raise writer[0].error from None
            raise

    atomic_write_stream(tmp / name, write, "a checkpoint shard", write_behind=True)
    digest = writer[0].hexdigest()
    atomic_write_text(tmp / (name + DIGEST_SUFFIX), digest, durable=False)  # read into the fsynced commit
    return digest


def write_rank_checkpoint(tmp: Path, name: str, state: dict[str, Any], tensors: dict[str, Any], group) -> None:
    """One rank's part of a step: its tensors into `dcp/` (a collective over `group`), their digests, then its
    small shard, whose digest (written last) says this rank is done."""
    files, digests = save_tensors(tmp, tensors, group)  # hashed while written
    write_digests(files, digests)
    write_rank_shard(tmp, name, state)


def write_digests(files: list[Path], chunks: dict[str, tuple[str, dict[str, str]]]) -> None:
    """`<file>.digest` beside each file this rank wrote (its DCP files), so the commit need not read them; for
    DCP data files also the digest of every saved chunk (recorded in metadata.json `items`)."""
    for f in files:
        if f.name in chunks:
            digest, items = chunks[f.name]
            text = json.dumps({"digest": digest, "items": items})
        else:
            text = file_digest(f)
        atomic_write_text(f.with_name(f.name + DIGEST_SUFFIX), text, durable=False)


def commit_checkpoint(root: str | Path, step: int, tmp: Path, meta: dict[str, Any], keep_last: int = 3) -> Path:
    """After every shard is on disk: hash them, write metadata.json (the commit marker), rename into place,
    point `latest` at it and drop all but the newest `keep_last` steps."""
    root, final = Path(root), step_dir(root, step)
    sums, items = {}, {}
    for f in sorted(tmp.rglob("*")):
        if f.is_file() and not f.name.endswith(DIGEST_SUFFIX):
            rel, digest = str(f.relative_to(tmp)), f.with_name(f.name + DIGEST_SUFFIX)
            text = digest.read_text().strip() if digest.is_file() else file_digest(f)
            if text.startswith("{"):  # a DCP data file: its digest and its chunks'
                record = json.loads(text)
                text, items[rel] = record["digest"], record["items"]
            sums[rel] = text
    for f in tmp.rglob("*" + DIGEST_SUFFIX):
        f.unlink()
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "digest": DIGEST, "shards": sums,
              **({"items": items, "items_digest": ITEMS_DIGEST} if items else {}), **meta}
    atomic_write_text(tmp / "metadata.json", json.dumps(record, indent=1, sort_keys=True))
    if final.exists():  # a re-save of the same step replaces it
        _discard(final)
    tmp.rename(final)
    atomic_write_text(root / "latest", final.name + "\n")
    for old in committed_steps(root)[:-keep_last]:
        _discard(step_dir(root, old))
    for stale in root.glob(".tmp-step-*"):  # left by a save that died (one save is in flight at a time)
        _discard(stale)
    threading.Thread(target=_empty_trash, args=(root,), name="checkpoint-trash", daemon=True).start()
    return final


def _discard(directory: Path) -> None:
    """Uncommit a step at once (a rename); its bytes are deleted off the critical path by `_empty_trash`."""
    directory.rename(directory.with_name(f".trash-{directory.name}-{time.time_ns()}"))


def _empty_trash(root: Path) -> None:
    for trash in root.glob(".trash-*"):
        shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(root: str | Path, step: int, shards: dict[str, dict[str, Any]], meta: dict[str, Any],
                    keep_last: int = 3) -> Path:
    """Write `shards` (file name -> state) as one committed step from a single process."""
    tmp = begin_checkpoint(root, step)
    for name, state in shards.items():
        write_rank_shard(tmp, name, state)
    return commit_checkpoint(root, step, tmp, meta, keep_last)


def committed_steps(root: str | Path) -> list[int]:
    """Steps with a metadata.json (committed), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / "metadata.json").is_file()]
    return sorted(steps)


Wanted = set[str] | Callable[[dict[str, Any]], set[str]] | None


def read_checkpoint(directory: str | Path, wanted: Wanted = None, share: tuple[int, int] = (0, 1)
                    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(metadata, top-level .pt shards) of one step directory, files verified against their checksums;
    `wanted` (a set, or a function of the metadata, e.g. of the layout that saved it) limits which shards are
    loaded. Each file is read once. `share` = (rank, world): this rank verifies the files it loads and every
    world-th other file (the ranks together verify all of them; `load_latest` falls back when any fails), so no
    rank reads the whole checkpoint. Raises ValueError naming the bad file."""
    directory = Path(directory)
    meta_path = directory / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{meta_path}: unreadable checkpoint metadata ({e})") from None
    if meta.get("format") != FORMAT or meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{meta_path}: expected {FORMAT} v{list(READABLE_VERSIONS)}, found "
                         f"{meta.get('format')} v{meta.get('format_version')}")
    algorithm = meta.get("digest", LEGACY)  # checkpoints before 2026-12-03: sha256
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{meta_path}: unknown digest {algorithm!r}; this version reads {list(ALGORITHMS)}")
    if callable(wanted):
        wanted = wanted(meta)
    shards = {}
    for name in files_read(meta, wanted, share):
        path, digest = directory / name, meta["shards"][name]
        if not path.is_file():
            raise ValueError(f"{path}: missing checkpoint shard")
        load = loaded(name, wanted)
        data = path.read_bytes() if load else None
        if (bytes_digest(data, algorithm) if load else file_digest(path, algorithm)) != digest:
            raise ValueError(f"{path}: checksum mismatch (corrupted or partially written)")
        if load:
            try:
                shards[name] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:  # an object that is not tensors/containers: never executed
                raise ValueError(f"{path}: refused: holds pickled objects other than tensors "
                                 f"({refusal_reason(e)})") from None
    return meta, shards


def loaded(name: str, wanted: set[str] | None) -> bool:
    return name.endswith(".pt") and "/" not in name and (wanted is None or name in wanted)


def files_read(meta: dict, wanted: set[str] | None, share: tuple[int, int]) -> list[str]:
    """The files of a step one rank reads to load `wanted` and verify its share of the checksums."""
    rank, world = share
    per_chunk = meta.get("items", {})  # verified chunk by chunk by the rank that reads it (dcp_format)
    return [name for i, name in enumerate(sorted(meta["shards"]))
            if loaded(name, wanted) or (i % world == rank and name not in per_chunk)]


def load_latest(root: str | Path, wanted: Wanted = None,
                then: Callable[[dict, dict], None] | None = None
                ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]] | None:
    """The newest committed step that verifies, falling back to older ones (with a warning saying why);
    None when there is none. A collective in a multi-rank job: rank 0 lists the steps, each rank reads the shards
    it needs, and all ranks fall back together when any one fails, so they never resume different steps.
    `then(meta, shards)` (e.g. the engines' DCP load, a collective) runs on a step every rank read; a corrupted
    chunk found there falls back too (any other error propagates)."""
    steps = broadcast_object(committed_steps(root) if process_rank() == 0 else None)
    for i in range(len(steps) - 1, -1, -1):
        found, error = None, "another rank could not read or verify its shards"
        try:
            found = read_checkpoint(step_dir(root, steps[i]), wanted, (process_rank(), group_size()))
        except (ValueError, OSError) as e:
            error = str(e)
        if not any_rank(found is None) and then is not None:
            try:
                then(*found)
            except ItemCorrupted as e:
                found, error = None, str(e)
        if not any_rank(found is None):
            return found
        fallback = f"falling back to step {steps[i - 1]}" if i else "no older checkpoint: starting afresh"
        log.warning("checkpoint step %d is unusable: %s; %s", steps[i], error, fallback)
    return None


def snapshot(state: Any) -> Any:
    """A copy of a (nested) state dict whose tensors are detached CPU copies: training may change the
    originals while the copy is written."""
    if torch.is_tensor(state):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: snapshot(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(v) for v in state)
    return state


def wait_for_shards(tmp: Path, names: list[str], timeout_s: float) -> None:
    """Block until every named shard is complete in `tmp` (its digest file, written last by its rank, exists)."""
    deadline = time.monotonic() + timeout_s
    while missing := [n for n in names if not (tmp / (n + DIGEST_SUFFIX)).is_file()]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{tmp}: shards {missing[:4]} not written within {timeout_s:.0f} s; their ranks "
                               "probably died, so this checkpoint stays uncommitted")
        time.sleep(0.02)




def resolve_step_dir(ckpt: str | Path, step: int | None = None) -> Path:
    """A step directory itself, or the newest (or `step`) committed step under a checkpoints root."""
    ckpt = Path(ckpt)
    if (ckpt / "metadata.json").is_file():
        return ckpt
    steps = committed_steps(ckpt)
    if not steps:
        raise FileNotFoundError(f"{ckpt}: no committed checkpoint (step-XXXXXXXX/metadata.json) found")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{ckpt}: no committed step {step}; committed: {steps}")
    return step_dir(ckpt, step if step is not None else steps[-1])


def layout_mismatch(directory: Path, saved: dict, layout: dict) -> ValueError:
    return ValueError(
        f"{directory}: saved with layout {saved}, this run is {layout}. DeepSpeed ZeRO partitions the optimizer "
        "state over the data-parallel ranks and cannot be resharded here; resume with the same parallel.tp/pp/"
        "zero_stage and world size (or consolidate the weights with `python -m parallel.consolidate` and start a "
        "new run)")


# -- layout-free slices ----------------------------------------------------------------------------------------
def source_ranks(layout: dict[str, int]) -> list[list[int]]:
    """Ranks whose shards hold the whole model once, grouped by pipeline stage, tensor-parallel rank order."""
    return [[rank_of(t, 0, p, layout) for t in range(layout["tp"])] for p in range(layout["pp"])]


def model_shards(meta: dict) -> set[str]:
    """The shards that hold every parameter once under the layout that saved `meta` (none for DeepSpeed ZeRO,
    whose states live in its own files)."""
    layout = meta.get("layout", SINGLE)
    if layout["zero_stage"] or meta.get("format_version", FORMAT_VERSION) >= 3:  # tensors in dcp/ (or DeepSpeed's)
        return set()
    return {shard_name(r) for stage in source_ranks(layout) for r in stage}


def assemble(shards: dict[int, dict[str, Any]], layout: dict[str, int], split: dict[str, int]
             ) -> tuple[dict, dict]:
    """Full (model, optimizer-by-name) state from the shards of `source_ranks(layout)`."""
    model, optim = {}, {}
    for stage in source_ranks(layout):
        parts = [shards[r] for r in stage]
        for name in parts[0]["model"]:
            model[name] = _cat([p["model"][name] for p in parts], tp_split_dim(name, split))
        for name, st in parts[0]["optim"].items():
            optim[name] = {k: (_cat([p["optim"][name][k] for p in parts], tp_split_dim(name, split))
                               if k in MOMENTS else v) for k, v in st.items()}
    return model, optim


def local_slice(name: str, full: torch.Tensor, tp: int, tp_rank: int, split: dict[str, int]) -> torch.Tensor:
    dim = tp_split_dim(name, split)
    if dim is None or tp == 1:
        return full
    if full.shape[dim] % tp:
        raise ValueError(f"{name}: size {full.shape[dim]} along dim {dim} cannot be split over tp={tp}")
    return full.chunk(tp, dim)[tp_rank].clone()


def _cat(pieces: list[torch.Tensor], dim: int | None) -> torch.Tensor:
    return pieces[0] if dim is None or len(pieces) == 1 else torch.cat(pieces, dim)


# -- consolidation ---------------------------------------------------------------------------------------------
def full_model_state(directory: str | Path, split: dict[str, int] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, dense model state) of one committed step directory, whatever layout saved it. `split` is the
    model's `tp_split` for checkpoints that predate its record in the metadata."""
    directory = Path(directory)
    meta, shards = read_checkpoint(directory, wanted=model_shards)  # verifies every file's checksum
    layout = meta.get("layout", SINGLE)
    if meta["format_version"] >= 3:  # every tensor by dense name in dcp/: read the model's whole
        model = read_all(directory, meta.get("items"), "model/")
        return meta, {k.removeprefix("model/"): v for k, v in model.items()}
    if layout["zero_stage"] == 0:
        split = meta.get("tp_split", split)
        if split is None and layout["tp"] > 1:
            raise ValueError(f"{directory}: a tp={layout['tp']} checkpoint without `tp_split` in its metadata; "
                             "resume it once with the trainer (its next checkpoint records it)")
        model, _ = assemble({shard_rank(n): s for n, s in shards.items()}, layout, split or {})
        return meta, model
    if layout["tp"] != 1:
        raise ValueError(f"{directory}: consolidating a DeepSpeed ZeRO-{layout['zero_stage']} checkpoint with tp="
                         f"{layout['tp']} is not supported; train with zero_stage=0 to get layout-free shards")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    verify_deepspeed_dir(directory / "deepspeed")  # zero_to_fp32 unpickles with weights_only=False
    return meta, dict(get_fp32_state_dict_from_zero_checkpoint(str(directory / "deepspeed"), tag="state"))


def write_consolidated(meta: dict, model: dict[str, torch.Tensor], out: str | Path) -> Path:
    info = {"format": CONSOLIDATED, "format_version": CONSOLIDATED_VERSION, "step": str(meta["step"]),
            "config": json.dumps(meta["config"], sort_keys=True)}
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in model.items()}
    atomic_write_bytes(out, save(tensors, metadata=info))
    return Path(out)


def read_consolidated(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], int]:
    """(config dict, weights, step) of a consolidated file; validates the format."""
    try:
        with safe_open(str(path), framework="pt") as f:
            info = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if info.get("format") != CONSOLIDATED or info.get("format_version") != CONSOLIDATED_VERSION:
        raise ValueError(f"{path}: expected {CONSOLIDATED} v{CONSOLIDATED_VERSION}, found {info.get('format')} "
                         f"v{info.get('format_version')}")
    return json.loads(info["config"]), weights, int(info["step"])
