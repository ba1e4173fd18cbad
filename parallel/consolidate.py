"""Consolidate a (sharded) VideoAR training checkpoint into one safetensors file for sampling or a new run.

    python -m parallel.consolidate --ckpt runs/demo/videoar/checkpoints [--step N] --out model.safetensors

Works for any dp x pp x tp layout saved with ZeRO stage 0 (the shards are put back together by parameter name,
see parallel.reshard) and for DeepSpeed ZeRO 1/2/3 checkpoints with tp = 1 (through DeepSpeed's
`get_fp32_state_dict_from_zero_checkpoint`). The file holds the dense model's weights and, in its metadata, the
run config and step; `python -m trainer.sample --ckpt model.safetensors` reads it directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from data_pipeline.storage import atomic_write_bytes
from parallel.reshard import assemble, source_ranks
from trainer.checkpoint import committed_steps, read_checkpoint, step_dir

FORMAT, FORMAT_VERSION = "videoar-model", "1"
SINGLE = {"tp": 1, "pp": 1, "dp": 1, "zero_stage": 0}


def resolve_step_dir(ckpt: str | Path, step: int | None = None) -> Path:
    ckpt = Path(ckpt)
    if (ckpt / "metadata.json").is_file():
        return ckpt
    steps = committed_steps(ckpt)
    if not steps:
        raise FileNotFoundError(f"{ckpt}: no committed checkpoint (step-XXXXXXXX/metadata.json) found")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{ckpt}: no committed step {step}; committed: {steps}")
    return step_dir(ckpt, step if step is not None else steps[-1])


def model_shards(meta: dict) -> set[str]:
    """The shards that hold every parameter once under the layout that saved `meta` (none for DeepSpeed ZeRO,
    whose states live in its own files)."""
    layout = meta.get("layout", SINGLE)
    if layout["zero_stage"]:
        return set()
    return {f"rank-{r:05d}.pt" for stage in source_ranks(layout) for r in stage}


def full_model_state(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, dense model state) of one committed step directory, whatever layout saved it."""
    directory = Path(directory)
    meta, shards = read_checkpoint(directory, wanted=model_shards)  # verifies every file's checksum
    layout = meta.get("layout", SINGLE)
    if layout["zero_stage"] == 0:
        model, _ = assemble({int(n[5:10]): s for n, s in shards.items()}, layout)
        return meta, model
    if layout["tp"] != 1:
        raise ValueError(f"{directory}: consolidating a DeepSpeed ZeRO-{layout['zero_stage']} checkpoint with tp="
                         f"{layout['tp']} is not supported; train with zero_stage=0 to get layout-free shards")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return meta, dict(get_fp32_state_dict_from_zero_checkpoint(str(directory / "deepspeed"), tag="state"))


def write_consolidated(meta: dict, model: dict[str, torch.Tensor], out: str | Path) -> Path:
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": str(meta["step"]),
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
    if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: expected {FORMAT} v{FORMAT_VERSION}, found {info.get('format')} "
                         f"v{info.get('format_version')}")
    return json.loads(info["config"]), weights, int(info["step"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--ckpt", required=True, help="checkpoints root (newest committed step) or a step directory")
    parser.add_argument("--step", type=int, help="a committed step under --ckpt (default: the newest)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    try:
        meta, model = full_model_state(resolve_step_dir(args.ckpt, args.step))
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    out = write_consolidated(meta, model, args.out)
    n = sum(v.numel() for v in model.values())
    print(f"step {meta['step']} ({meta.get('layout', SINGLE)}): {len(model)} tensors, {n / 1e6:.2f}M parameters -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
