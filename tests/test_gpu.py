"""On a CUDA GPU: the same step gives the CPU's results, and collectives run on NCCL (>= 2 GPUs). Skipped with the
reason where there is no GPU (this CI); `python -m benchmarks.gpu_smoke` runs them on a GPU node, and
`test_gpu_smoke_script_runs_on_the_cpu` below keeps that script working here."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.gpu_smoke import _config, main as gpu_smoke
from common.job_config import ParallelConfig
from models.objective import BitObjective, prepare_batch, sample_generator
from models.quantizer import MultiScaleBitwiseQuantizer
from models.sampler import SamplingConfig, sample
from models.videoar import VideoAR
from parallel.collectives import all_reduce, any_rank, group_device, max_over_ranks
from parallel.engine import TorchEngine
from parallel.launch import run_local
from parallel.topology import SINGLE, init_topology
from trainer.curriculum import Curriculum

NO_GPU = "needs a CUDA GPU; this machine has none (CPU-only torch): run `python -m benchmarks.gpu_smoke` on one"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs for NCCL; " + NO_GPU)


def _step(device: torch.device):
    cfg = _config("tiny", [1, 2, 4], device.type, ["videoar_train.precision=fp32"], frames=2)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = VideoAR(cfg.videoar, cfg.tokenizer.latent_dim).to(device)
    q = MultiScaleBitwiseQuantizer(cfg.tokenizer.latent_dim, cfg.quantizer).to(device)
    stage = dataclasses.replace(Curriculum(cfg.curriculum).stages[0], p_mask=0.5)
    h, w = q.sizes[-1]
    latents = torch.randn(2, 2, q.dim, h, w, generator=torch.Generator().manual_seed(1)).to(device)
    cond = torch.randn(2, cfg.videoar.text_len, cfg.videoar.text_dim, generator=torch.Generator().manual_seed(2))
    batch = prepare_batch(q, model.layout_for(2, q.sizes), latents, cond.to(device), stage, 0.5, 0.3, 0.0, 0.01,
                          [sample_generator(0, 0, j) for j in range(2)])
    engine = TorchEngine(model, model.parallel_plan(), SINGLE, cfg.parallel, cfg.videoar_train, 10, device)
    layout = model.layout_for(2, q.sizes)
    loss, _ = engine.forward_backward([(batch.split(1), BitObjective(layout.length - layout.prefix_len))])
    norm, applied = engine.step()
    bits = sample(model.eval(), q, cond[:1].to(device), 2, SamplingConfig(cfg_scale=1.0, temperature=0.0)).bits
    return batch, float(loss), norm, [p.detach().cpu() for p in model.parameters()], [b.cpu() for b in bits]


@pytest.mark.gpu
@needs_cuda
def test_a_cuda_step_equals_the_cpu_step():
    cpu, cuda = _step(torch.device("cpu")), _step(torch.device("cuda", 0))
    # the same CPU-generator draws: identical flips, frame mask and condition dropout on either device
    for name in ("targets", "drop", "mask"):
        assert torch.equal(getattr(cpu[0], name), getattr(cuda[0], name).cpu()), name
    assert cuda[1] == pytest.approx(cpu[1], rel=1e-4) and cuda[2] == pytest.approx(cpu[2], rel=1e-3)
    for a, b in zip(cpu[3], cuda[3]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


def _nccl_worker(rank, world, out):
    init_topology(ParallelConfig(), "cuda")
    assert group_device() == torch.device("cuda", torch.cuda.current_device())
    cpu = torch.tensor([float(rank + 1)])  # a CPU tensor against the NCCL group: the helper moves it
    all_reduce(cpu)
    flags = any_rank(rank == 1), max_over_ranks({"t": float(rank)})["t"]
    torch.save({"sum": cpu, "flags": flags}, f"{out}/nccl{rank}.pt")


@pytest.mark.gpu
@needs_cuda
@needs_two
def test_collectives_on_nccl_take_cpu_tensors(tmp_path):
    run_local(2, _nccl_worker, tmp_path)
    for r in range(2):
        got = torch.load(tmp_path / f"nccl{r}.pt", weights_only=True)
        assert got["sum"].item() == 3.0 and got["flags"] == (True, 1.0)


def test_gpu_smoke_script_runs_on_the_cpu(capsys):
    """The GPU smoke script's own code path, on the CPU at tiny sizes: every row passes and the table prints."""
    assert gpu_smoke(["--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "train demo" in out and "train L_8k" in out and "KV-cached sampling" in out and " NO " not in out


def test_gpu_smoke_without_a_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_smoke([]) == 2
    assert "no CUDA device visible" in capsys.readouterr().err
