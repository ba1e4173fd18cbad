"""Consolidate a (sharded) VideoAR training checkpoint into one safetensors file for sampling or a new run.

    python -m parallel.consolidate --ckpt runs/demo/videoar/checkpoints [--step N] --out model.safetensors

Works for every layout and ZeRO stage: the weights are read from the step's DCP directory by dense parameter name
(parallel/dcp_format.py). Format-2 checkpoints: any ZeRO-0 layout (shards put back together by name) and DeepSpeed
ZeRO 1/2/3 with tp = 1 (through DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`). The file holds the dense model's weights and, in its metadata, the
run config and step; `python -m trainer.sample --ckpt model.safetensors` reads it directly.
"""

from __future__ import annotations

import argparse
import sys

from parallel.checkpoint_format import SINGLE, full_model_state, resolve_step_dir, write_consolidated


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
