"""GPU datasheet figures, the one table of them: the trainer's MFU denominator (trainer/flops.py) and the capacity
planner's GPUs (parallel/plan.py).

Sources (NVIDIA datasheets, dense bf16 tensor-core peaks, i.e. without 2:4 sparsity):
- H100 SXM5: "NVIDIA H100 Tensor Core GPU" datasheet: 989 TFLOP/s bf16 (1,979 with sparsity), 80 GB HBM3,
  3.35 TB/s, NVLink 4 900 GB/s per GPU (bidirectional, 450 GB/s each way). H100 PCIe: 756 TFLOP/s.
- H200 SXM: "NVIDIA H200 Tensor Core GPU" datasheet: 989 TFLOP/s bf16, 141 GB HBM3e, 4.8 TB/s, NVLink 900 GB/s.
- A100 SXM4 80GB: "NVIDIA A100 Tensor Core GPU" datasheet: 312 TFLOP/s bf16, 80 GB HBM2e, NVLink 3 600 GB/s.
- Inter-node: a DGX H100 / HGX node has 8 ConnectX-7 NICs of 400 Gb/s InfiniBand NDR (one per GPU): 50 GB/s per
  GPU each way; a DGX A100 8 x 200 Gb/s HDR: 25 GB/s per GPU ("NVIDIA DGX H100 / DGX A100 user guide").
Bandwidths below are one direction (what a ring collective's send side moves), so NVLink is 900 / 2 GB/s.
"""

from __future__ import annotations

from dataclasses import dataclass

# dense bf16 tensor-core peaks (FLOP/s per GPU), matched by substring of torch.cuda.get_device_name()
DATASHEET_BF16_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
                        ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
                        ("A6000", 155e12), ("A10", 125e12), ("L4", 121e12), ("4090", 165e12), ("V100", 125e12))


def datasheet_peak_flops(device_name: str) -> float | None:
    """The datasheet dense bf16 peak of a GPU by name, or None for a GPU not in the table."""
    for key, flops in DATASHEET_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


@dataclass(frozen=True)
class GPUSpec:
    name: str
    bf16_flops: float  # dense peak, FLOP/s
    memory_bytes: float  # HBM
    intra_node_bw: float  # NVLink, bytes/s one direction per GPU
    inter_node_bw: float  # InfiniBand, bytes/s one direction per GPU
    gpus_per_node: int = 8


GB = 1e9
GPUS = {
    "h100": GPUSpec("H100 SXM 80GB", datasheet_peak_flops("H100"), 80 * GB, 450 * GB, 50 * GB),
    "h200": GPUSpec("H200 SXM 141GB", datasheet_peak_flops("H200"), 141 * GB, 450 * GB, 50 * GB),
    "a100": GPUSpec("A100 SXM 80GB", datasheet_peak_flops("A100"), 80 * GB, 300 * GB, 25 * GB),
}
