"""Capacity planner (issue 18): before submitting, which (tp, pp, cp, dp, ZeRO stage, activation checkpointing,
micro-batch) layouts of a config fit a number of GPUs at each curriculum stage, with how much memory per GPU and
how long a step takes, ranked by step time.

    python -m parallel.plan --config configs/videoar_xl.yaml --gpus 64 [--gpu h100|h200|a100] [--mfu 0.4]
        [--top 5] [--stage III] [--json] [key.sub=value ...]

Memory: parameters, gradients, optimizer states (ZeRO 0-3), activations, attention workspace, backward
transients and buffers per GPU; step time: FLOPs (common/flops_model.py, the trainer's MFU count) / achievable
FLOP/s, plus TP / CP / DP / PP bytes / link bandwidths, plus the pipeline bubble (parallel/plan_model.py). GPU
figures: common/gpu_specs.py (NVIDIA datasheets). A layout is infeasible when its memory exceeds `--usable` of
the GPU's, or it breaks a divisibility rule (heads and MLP width % tp, depth >= pp, heads / tp % cp, every
sequence % cp, cp and ZeRO need pp = 1, batch % dp x micro-batch): those are counted by reason. Validated on CPU
against measured peak memory and collective bytes: benchmarks/plan_validation.py.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import asdict

from common.config import Config, config_arg_parser, config_from_args
from common.gpu_specs import GPUS, GPUSpec
from parallel.plan_model import Layout, Precision, Shape, memory, model_params, step_time

POWERS = (1, 2, 4, 8, 16, 32, 64)
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)


def stage_shapes(cfg: Config) -> dict[str, list[Shape]]:
    """Curriculum stage name -> its parts (clips, images) as sequence shapes."""
    tau, prefix = cfg.tokenizer.temporal_compression, cfg.videoar.prefix_len
    out = {}
    for stage in cfg.curriculum:
        out[stage.name] = [Shape(p.name, prefix, 1 + (p.frames - 1) // tau, tuple(p.sizes), p.global_batch, p.window)
                           for p in stage.parts()]
    return out


def layout_problem(cfg: Config, shapes: list[Shape], lay: Layout) -> str | None:
    """Why a layout cannot run (common/job_config.py ParallelConfig's rules, tensor and context parallelism's
    divisibility), or None."""
    v = cfg.videoar
    if v.heads % lay.tp or v.mlp_hidden % lay.tp:
        return "heads or MLP width % tp"
    if v.depth < lay.pp:
        return "depth < pp"
    if lay.cp > 1 and lay.pp > 1:
        return "cp needs pp = 1"
    if lay.zero and lay.pp > 1:
        return "ZeRO needs pp = 1"
    if (v.heads // lay.tp) % lay.cp:
        return "heads / tp % cp"
    if any(s.length % lay.cp for s in shapes):
        return "sequence length % cp"
    if any(s.global_batch % (lay.dp * lay.micro_batch) for s in shapes):
        return "batch % (dp x micro-batch)"
    return None


def candidates(gpus: int):
    for tp in POWERS:
        for pp in POWERS:
            for cp in POWERS:
                if gpus % (tp * pp * cp):
                    continue
                dp = gpus // (tp * pp * cp)
                for zero in (0, 1, 2, 3):
                    for ac in (False, True):
                        for mb in MICRO_BATCHES:
                            yield Layout(tp, pp, cp, dp, zero, ac, mb)


def plan_stage(cfg: Config, shapes: list[Shape], gpus: int, gpu: GPUSpec, prec: Precision, mfu: float,
               usable: float) -> tuple[list[dict], Counter]:
    """Every feasible layout of one stage, fastest first, and the count of the others by reason."""
    latent, rows, rejected = cfg.tokenizer.latent_dim, [], Counter()
    for lay in candidates(gpus):
        problem = layout_problem(cfg, shapes, lay)
        if problem is None:
            mem = memory(cfg.videoar, latent, shapes, lay, prec)
            if mem["total"] > usable * gpu.memory_bytes:
                problem = f"memory > {usable:.0%} of {gpu.memory_bytes / 1e9:.0f} GB"
            else:
                rows.append({"layout": asdict(lay), "memory": mem,
                             "time": step_time(cfg.videoar, latent, shapes, lay, prec, gpu, mfu)})
        if problem:
            rejected[problem] += 1
    rows.sort(key=lambda r: (r["time"]["total"], r["memory"]["total"]))
    return rows, rejected


def _name(lay: dict) -> str:
    ac = "AC" if lay["ac"] else "--"
    return (f"tp{lay['tp']} pp{lay['pp']} cp{lay['cp']} dp{lay['dp']} Z{lay['zero']} {ac} "
            f"mb{lay['micro_batch']}")


def render(stage: str, shapes: list[Shape], rows: list[dict], rejected: Counter, top: int) -> str:
    gb, ms = 1e9, 1e3
    parts = ", ".join(f"{s.global_batch} x {s.length} tok" for s in shapes)
    lines = [f"stage {stage} ({parts}): {len(rows)} feasible; rejected: "
             + (", ".join(f"{n} {why}" for why, n in rejected.most_common()) or "none"),
             f"{'rank':>4} {'layout':<32} {'mem GB':>7} {'params':>6} {'grads':>6} {'optim':>6} {'acts':>6} "
             f"{'attn':>5} {'other':>5} | {'step s':>7} {'comp':>6} {'tp':>5} {'cp':>5} {'dp':>5} {'bubble':>6} "
             f"{'MFU':>5}"]
    for i, r in enumerate(rows[:top], 1):
        m, t = r["memory"], r["time"]
        other = m["transients"] + m["buffers"]
        lines.append(f"{i:>4} {_name(r['layout']):<32} {m['total'] / gb:>7.1f} {m['parameters'] / gb:>6.1f} "
                     f"{m['gradients'] / gb:>6.1f} {m['optimizer'] / gb:>6.1f} {m['activations'] / gb:>6.1f} "
                     f"{m['attention_workspace'] / gb:>5.1f} {other / gb:>5.1f} | {t['total']:>7.2f} "
                     f"{t['compute']:>6.2f} {t['tp']:>5.2f} {t['cp']:>5.2f} {t['dp']:>5.2f} {t['bubble']:>6.2f} "
                     f"{t['mfu']:>5.0%}")
    return "\n".join(lines)


def configured(rows: list[dict], cfg: Config) -> int | None:
    """Rank (1-based) of the config's own parallel section among `rows`, or None when infeasible."""
    p = cfg.parallel
    for i, r in enumerate(rows, 1):
        lay = r["layout"]
        if (lay["tp"], lay["pp"], lay["cp"], lay["zero"], lay["ac"]) == (p.tp, p.pp, p.cp, p.zero_stage,
                                                                         p.activation_checkpointing):
            return i
    return None


def plan(cfg: Config, gpus: int, gpu: str = "h100", mfu: float = 0.4, usable: float = 0.9,
         stages: list[str] | None = None) -> dict:
    """The planner's whole answer as plain data (what --json prints)."""
    spec = GPUS[gpu]
    bf16 = cfg.videoar_train.precision != "fp32"  # auto is bf16 on the GPUs planned for
    prec = Precision("bf16" if bf16 else "fp32", cfg.parallel.grad_accum_dtype,
                     "sdpa" if cfg.videoar.attention == "sdpa" else "flex", cfg.parallel.pp_schedule)
    out = {"gpus": gpus, "gpu": asdict(spec), "mfu": mfu, "usable": usable, "precision": asdict(prec),
           "parameters": model_params(cfg.videoar, cfg.tokenizer.latent_dim), "stages": {}}
    for name, shapes in stage_shapes(cfg).items():
        if stages and name not in stages:
            continue
        rows, rejected = plan_stage(cfg, shapes, gpus, spec, prec, mfu, usable)
        out["stages"][name] = {"shapes": [asdict(s) | {"length": s.length} for s in shapes], "feasible": rows,
                               "rejected": dict(rejected), "configured_rank": configured(rows, cfg)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = config_arg_parser(__doc__.split("\n\n")[0], default_config="configs/videoar_xl.yaml")
    parser.add_argument("--gpus", type=int, default=64, help="GPUs of the job (default 64)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU model (common/gpu_specs.py)")
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="achievable fraction of the datasheet bf16 peak for the model's GEMMs (default 0.4)")
    parser.add_argument("--usable", type=float, default=0.9,
                        help="fraction of GPU memory a layout may plan to use (CUDA context, fragmentation)")
    parser.add_argument("--top", type=int, default=5, help="rows per stage in the table")
    parser.add_argument("--stage", action="append", help="only this curriculum stage (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the whole plan as JSON instead of tables")
    args = parser.parse_args(argv)
    if args.gpus < 1 or not 0 < args.mfu <= 1 or not 0 < args.usable <= 1:
        parser.error("--gpus must be >= 1, --mfu and --usable in (0, 1]")
    cfg = config_from_args(args, parser)
    result = plan(cfg, args.gpus, args.gpu, args.mfu, args.usable, args.stage)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    spec = GPUS[args.gpu]
    print(f"{args.config}: VideoAR {cfg.videoar.depth} x {cfg.videoar.width} ({cfg.videoar.heads} heads), "
          f"{result['parameters'] / 1e9:.2f}B parameters, on {args.gpus} x {spec.name}, MFU {args.mfu:.0%} "
          f"assumed; memory per GPU (GB), seconds per optimizer step")
    for name, st in result["stages"].items():
        shapes = [Shape(**{k: v for k, v in s.items() if k != "length"}) for s in st["shapes"]]
        print(render(name, shapes, st["feasible"], Counter(st["rejected"]), args.top))
        rank = st["configured_rank"]
        print(f"     the config's parallel section (tp{cfg.parallel.tp} pp{cfg.parallel.pp} cp{cfg.parallel.cp} "
              f"Z{cfg.parallel.zero_stage}{' AC' if cfg.parallel.activation_checkpointing else ''}): "
              + (f"best at rank {rank}" if rank else "infeasible") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
