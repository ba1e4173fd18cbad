"""Data-parallel gradient averaging in buckets (the ZeRO-0 engine's), the way torch DDP and megatron-core's DDP do
it: parameters are grouped, in reverse registration order (about the order backward produces their gradients),
into buckets of at most `bucket_elems` elements; each bucket is flattened and summed over the data-parallel group
in one asynchronous collective. When `arm()` was called before the last micro-batch's backward, a bucket's
reduction starts from a post-accumulate-grad hook as soon as its last gradient is final, so communication overlaps
the rest of the backward; `reduce()` starts what is left, waits, divides by dp and writes the averages back.
"""

from __future__ import annotations

import torch
from torch import nn

from parallel.collectives import all_reduce_start, group_device

DEFAULT_BUCKET_ELEMS = 25 * 2**20  # 25M elements: 100 MB of fp32 gradients, torch DDP's default bucket size


class _Bucket:
    def __init__(self, params: list[nn.Parameter]):
        self.params, self.ready, self.flat, self.handle = params, 0, None, None

    def start(self, group) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.handle is not None or not grads:
            return
        self.flat = torch.cat([g.reshape(-1) for g in grads])
        self.handle = all_reduce_start(self.flat, group)

    def finish(self, dp: int) -> None:
        if self.handle is None:
            return
        self.handle.wait()
        self.flat.div_(dp)
        start = 0
        for p in self.params:
            if p.grad is not None:
                n = p.grad.numel()
                p.grad.copy_(self.flat[start:start + n].view_as(p.grad))
                start += n
        self.flat = self.handle = None


class GradBuckets:
    def __init__(self, params: list[nn.Parameter], group, dp: int, bucket_elems: int = DEFAULT_BUCKET_ELEMS):
        self.group, self.dp, self.armed = group, dp, False
        device = group_device(group)
        self.buckets: list[_Bucket] = []
        current, size, key = [], 0, None
        for p in reversed([p for p in params if p.requires_grad]):
            k = (p.dtype, p.device)
            if current and (size + p.numel() > bucket_elems or k != key):
                self.buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(p)
            size, key = size + p.numel(), k
        if current:
            self.buckets.append(_Bucket(current))
        # hooks only where the gradients already live on the group's device (NCCL + CUDA, gloo + CPU)
        self.overlap = all(p.device == device for b in self.buckets for p in b.params)
        if self.overlap:
            for bucket in self.buckets:
                for p in bucket.params:
                    p.register_post_accumulate_grad_hook(lambda _p, b=bucket: self._on_grad(b))

    def arm(self) -> None:
        """The next backward is the step's last: start each bucket's reduction as soon as it is complete."""
        self.armed = self.overlap

    def _on_grad(self, bucket: _Bucket) -> None:
        if not self.armed:
            return
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            bucket.start(self.group)

    def reduce(self) -> None:
        """Average every gradient over the data-parallel group (starting the buckets not started yet)."""
        self.armed = False
        for bucket in self.buckets:
            bucket.start(self.group)  # no-op for a bucket already started by its hooks
        for bucket in self.buckets:
            bucket.finish(self.dp)
            bucket.ready = 0
