"""Device discipline without a GPU: one training step and one sampling step with every model and batch tensor on
the `meta` device, and a static check that every collective goes through parallel/collectives.py.

Why `meta`: this CPU-only torch cannot build CUDA tensors (FakeTensorMode's fake `cuda` tensors break at the first
`.to("cuda")`), but a meta tensor meeting a CPU tensor in an op raises "Tensor on device cpu is not on the expected
device meta", as a CUDA tensor meeting a CPU one does. Meta tensors hold no values, so the step runs through the
same code with shapes only.

What it catches: a tensor created on (or left on) the CPU that meets the model's parameters, the batch, the mask,
the RoPE angles, the loss, the gradients or the optimizer state in the step (the defects of issue 14 item 1 and the
grad-norm accumulator of item 2). What it cannot catch: host syncs (`.item()`, `float(t)`: not possible on meta, so
the grad-norm's one host read is left out), a CPU generator used for a CUDA draw (`torch.rand(generator=cpu,
device="meta")` is allowed), CPU 0-d scalars and CPU index tensors (allowed on CUDA too), NCCL-only behaviour and
speed. The GPU tests (`-m gpu`, benchmarks/gpu_smoke.py) cover those on a machine with a GPU.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from common.config import load_config
from models.objective import BitObjective, prepare_batch, sample_generator, scale_loss_weights
from models.quantizer import MultiScaleBitwiseQuantizer
from models.sampler import SamplingConfig, sample
from models.videoar import VideoAR
from parallel.engine import TorchEngine, global_grad_norm
from parallel.topology import SINGLE
from tests.conftest import TINY, VIDEOAR
from trainer.curriculum import Curriculum

META = torch.device("meta")
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "models", "parallel", "data_pipeline", "trainer", "jobs")
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "broadcast", "broadcast_object_list",
               "barrier", "monitored_barrier", "reduce", "gather", "gather_object", "scatter", "scatter_object_list",
               "send", "recv", "isend", "irecv", "batch_isend_irecv"}


def _parts(cond: str):
    cfg = load_config(None, TINY + VIDEOAR + [f"videoar.cond={cond}", "videoar.text_len=4", "videoar.text_dim=16"])
    stage = dataclasses.replace(Curriculum(cfg.curriculum).stages[0], p_mask=0.5, window=1)  # Random Frame Mask on
    torch.manual_seed(0)
    model = VideoAR(cfg.videoar, cfg.tokenizer.latent_dim)
    q = MultiScaleBitwiseQuantizer(cfg.tokenizer.latent_dim, cfg.quantizer)
    return cfg, stage, model.to(META), q.for_sizes(stage.sizes).to(META)


def _cond(cfg, b: int) -> torch.Tensor:
    if cfg.videoar.cond == "text":
        return torch.randn(b, cfg.videoar.text_len, cfg.videoar.text_dim, device=META)
    return torch.zeros(b, dtype=torch.long, device=META)


@pytest.mark.parametrize("cond", ["class", "text"])
def test_train_step_and_sampling_step_keep_every_tensor_on_the_device(cond):
    cfg, stage, model, q = _parts(cond)
    b, frames = 4, 2
    h, w = q.sizes[-1]
    latents = torch.randn(b, frames, q.dim, h, w, device=META)
    layout = model.layout_for(frames, q.sizes)
    gens = [sample_generator(cfg.run.seed, 0, j) for j in range(b)]
    # CFEC flips, frame mask, condition dropout: drawn from CPU generators, everything returned on the device
    batch = prepare_batch(q, layout, latents, _cond(cfg, b), stage, 0.5, 0.3, 0.0, 0.01, gens)
    for name in ("features", "targets", "cond", "drop", "visibility", "flip_ratio"):
        assert getattr(batch, name).device == META, name
    engine = TorchEngine(model, model.parallel_plan(), SINGLE, cfg.parallel, cfg.videoar_train, 10, META)
    objective = BitObjective(layout.length - layout.prefix_len, scale_loss_weights(layout, "sqrt_area"))
    # forward, loss, backward over 2 micro-batches
    loss, (stats,) = engine.forward_backward([(batch.split(2), objective)])
    assert loss.device == META and stats.device == META and stats.shape == (objective.stats_size,)
    params = [p for p in model.parameters() if p.grad is not None]
    assert params and all(p.grad.device == META for p in params)
    assert global_grad_norm(params, SINGLE).device == META
    engine.opt.step()  # AdamW: moments created next to the parameters
    assert all(v.device == META for p in params for k, v in engine.opt.state[p].items() if k != "step")
    # one KV-cached sampling pass with guidance and a CPU generator (2 frames x 3 scales)
    res = sample(model, q, _cond(cfg, 2), frames, SamplingConfig(cfg_scale=3.0, temperature=1.0, top_p=0.9),
                 generator=torch.Generator().manual_seed(0))
    assert res.forwards == frames * q.num_scales and res.latent.device == META
    assert all(x.device == META for x in res.bits)


def test_a_cpu_tensor_meeting_the_step_fails():
    """The check has teeth: a CPU frame-visibility table or dense mask handed to the meta model raises, as it
    would against CUDA parameters."""
    cfg, stage, model, q = _parts("class")
    layout = model.layout_for(1, q.sizes)
    features = torch.randn(2, layout.length - layout.prefix_len, q.dim, device=META)
    cpu_mask = torch.ones(2, layout.length, layout.length, dtype=torch.bool)
    drop = torch.zeros(2, dtype=torch.bool, device=META)
    with pytest.raises(RuntimeError, match="device"):
        model(_cond(cfg, 2), features, layout, torch.ones(2, 1, 1, dtype=torch.bool), drop)
    with pytest.raises(RuntimeError, match="device"):
        model(_cond(cfg, 2), features, layout, None, drop, mask=cpu_mask)


def _distributed_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name in ("torch.distributed", "deepspeed.comm")}
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "deepspeed"):
            aliases |= {a.asname or a.name for a in node.names if a.name in ("distributed", "comm")}
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch.distributed", "deepspeed.comm"):
            bad = sorted({a.name for a in node.names} & COLLECTIVES)
            if bad:
                return [f"{path.relative_to(ROOT)}:{node.lineno}: imports {bad} from {node.module}"]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in aliases:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {owner}.{node.func.attr}(...)")
    return found


def test_every_collective_goes_through_the_one_helper():
    helper = ROOT / "parallel" / "collectives.py"
    calls = [c for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py")) if f != helper
             for c in _distributed_calls(f)]
    assert not calls, "collectives outside parallel/collectives.py:\n" + "\n".join(calls)
    assert _distributed_calls(helper), "the scan finds nothing even in the helper: it is broken"
