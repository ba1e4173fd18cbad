"""Per-rank parameter + optimizer-state bytes under DeepSpeed ZeRO 0/1/2/3, next to the ZeRO paper's figures
(Table 1) and as ratios to plain data parallelism (ZeRO-0: every rank holds everything), measured side by side.

    python -m benchmarks.zero_memory [--width 512 --depth 4] [--dtype fp32|bf16] [--dp 2]

Each layout trains one step of the same VideoAR on 2 gloo ranks; then every tensor a rank keeps between steps
(its parameter storage and all tensors reachable from the optimizer: moments, ZeRO's flat fp32 partitions and
communication buckets) is counted once by storage. Gradients, activations and temporaries are not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from parallel.launch import run_local


def _tensors(obj, seen: set[int], depth: int = 0):
    """Every tensor reachable from obj through lists, tuples, dicts and object attributes (bounded depth)."""
    if depth > 6 or id(obj) in seen:
        return
    seen.add(id(obj))
    if torch.is_tensor(obj):
        yield obj
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(k, seen, depth + 1)
            yield from _tensors(v, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _tensors(v, seen, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)) and \
            type(obj).__module__.split(".")[0] in ("torch", "deepspeed"):
        for v in vars(obj).values():
            yield from _tensors(v, seen, depth + 1)


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _measure(rank, world, zero, width, depth, out, dtype="fp32", grad_accum="fp32"):
    from models.quantizer import MultiScaleBitwiseQuantizer, QuantizerConfig
    from models.sequence_inputs import sequence_targets, teacher_forcing_features
    from models.videoar import VideoAR, VideoARConfig
    from common.job_config import ParallelConfig
    from parallel.parallelize import parallelize
    from parallel.topology import init_topology
    from common.train_config import VideoARTrainConfig
    from models.objective import BitObjective, MicroBatch

    import parallel.deepspeed_engine as dse

    if dtype == "bf16":  # DeepSpeed's bf16 mode (the cluster presets'), which the trainer enables on CUDA only
        plain = dse.deepspeed_config
        dse.deepspeed_config = lambda *a, **k: {**plain(*a, **k), "bf16": {"enabled": True}}
    pcfg = ParallelConfig(zero_stage=zero, grad_accum_dtype=grad_accum)
    topo = init_topology(pcfg)
    torch.manual_seed(0)
    model = VideoAR(VideoARConfig(preset="custom", depth=depth, width=width, heads=8, cond="class", num_classes=4), 16)
    tcfg = VideoARTrainConfig(precision=dtype)
    device = torch.device("cpu")
    engine = parallelize(model, model.parallel_plan(), topo, pcfg, tcfg, 10, device, 2 * world, 2)
    q = MultiScaleBitwiseQuantizer(16, QuantizerConfig(scales=[1, 2, 4]))
    bits = [torch.rand(2, 2, 16, s, s) > 0.5 for s in (1, 2, 4)]
    layout = model.layout_for(2, q.sizes)
    mb = MicroBatch(teacher_forcing_features(q, bits), sequence_targets(bits), torch.tensor([0, 1]),
                    torch.zeros(2, dtype=torch.bool), None, torch.zeros(2), layout)
    engine.forward_backward([([mb], BitObjective(layout.length - layout.prefix_len))])
    engine.step()
    params = [getattr(p, "ds_tensor", p) if zero == 3 else p for p in engine.module.parameters()]
    opt = engine.engine.optimizer if zero else engine.opt
    grads = {id(p.grad) for p in engine.module.parameters() if p.grad is not None}
    opt_tensors = [t for t in _tensors(opt, set()) if id(t) not in grads]
    result = {"params": _bytes(params), "total": _bytes(params + opt_tensors),
              "numel": sum(p.numel() for p in model.parameters())}
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def theory(zero: int, dtype: str, dp: int, psi: int) -> tuple[float, float]:
    """(params + optimizer states, gradients) per rank in bytes, the ZeRO paper's Table 1 accounting: mixed
    precision keeps 2-byte params and grads and K = 12 bytes of optimizer state (fp32 master copy, Adam m and v);
    fp32 training 4-byte params and grads and K = 8 (m and v). ZeRO-1 partitions the optimizer states, ZeRO-2
    the gradients too, ZeRO-3 the parameters too."""
    p, g, k = (2, 2, 12) if dtype == "bf16" else (4, 4, 8)
    params = p * psi / (dp if zero == 3 else 1)
    grads = g * psi / (dp if zero >= 2 else 1)
    opt = k * psi / (dp if zero >= 1 else 1)
    return params + opt, grads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: DeepSpeed's bf16 mode, as the cluster presets train (ZeRO-0 stays fp32 here: "
                             "the torch engine uses autocast, fp32 weights)")
    parser.add_argument("--dp", type=int, default=2, help="data-parallel ranks (gloo processes)")
    parser.add_argument("--grad-accum", choices=("fp32", "bf16"), default="fp32",
                        help="with --dtype bf16: parallel.grad_accum_dtype (DeepSpeed's data_types.grad_accum_dtype)")
    args = parser.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for zero in (0, 1, 2, 3):
            out = Path(tmp) / f"zero{zero}.json"
            run_local(args.dp, _measure, zero, args.width, args.depth, str(out), args.dtype if zero else "fp32",
                      args.grad_accum)
            rows[zero] = json.loads(out.read_text())
    psi, base = rows[0]["numel"], rows[0]["total"]
    print(f"VideoAR depth {args.depth} width {args.width}: {psi / 1e6:.1f}M parameters (psi), AdamW, "
          f"{args.dtype} (gradient accumulation {args.grad_accum}), dp = {args.dp}; per rank, persistent between steps (gradients are freed after the step)")
    print(f"{'layout':<8} {'params MB':>10} {'params+optimizer MB':>20} {'theory MB':>10} {'measured/theory':>16} "
          f"{'ratio to ZeRO-0':>16} {'theory grads MB':>16}")
    for zero, r in rows.items():
        want, grads = theory(zero, args.dtype if zero else "fp32", args.dp, psi)
        print(f"ZeRO-{zero:<3} {r['params'] / 2**20:>10.1f} {r['total'] / 2**20:>20.1f} {want / 2**20:>10.1f} "
              f"{r['total'] / want:>16.2f} {r['total'] / base:>16.2f} {grads / 2**20:>16.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
