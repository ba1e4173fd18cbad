"""Training engines behind one interface (`Engine`): how one optimizer step's micro-batches become gradients and
an update, per layout, and how an engine's state goes into and out of a checkpoint.

- `TorchEngine`: one process, or any dp x pp x tp with ZeRO stage 0: megatron-core tensor-parallel layers,
  torch.distributed.pipelining stages, gradients averaged over the data-parallel group, the global grad norm
  summed over the model-parallel group (each tensor-parallel shard once, replicated parameters once).
- `DeepSpeedEngine` (parallel/deepspeed_engine.py): ZeRO stage 1/2/3 (pp = 1, any tp).
The engine knows no model: it gets an `nn.Module`, its `ParallelPlan` and, per step, micro-batches and an
`Objective`. A micro-batch has `model_args()` (for `module(*args)`), `stage_args()` (tensors for the first
pipeline stage), `static` (the step's non-tensor argument, e.g. the token layout), `targets` and `len()`.
One step may hold groups of micro-batches of different shapes (e.g. the images and the clips of a joint
image-video stage), each with its own objective: `forward_backward([(micro, objective), ...])`; every micro-batch
weighs the same in the step's gradient (their mean), and each group's statistics come back separately.
A step whose global gradient norm is not finite is skipped (Megatron's rule; a non-finite loss is made to give
NaN gradients, `poison_if_nonfinite`, so it counts too): no update, the LR schedule does not advance, gradients
are dropped; `step()` says whether the update was applied. Every rank takes the same decision.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from common.job_config import ParallelConfig
from common.parallel_plan import ParallelPlan
from common.precision import autocast
from parallel import checkpoint_format as fmt
from parallel.collectives import all_reduce, all_reduce_packed, data_parallel_group, model_parallel_group
from parallel.collectives import context_parallel_group, data_context_parallel_group, pipeline_group
from parallel.dcp_format import local_tensor, tp_slice
from parallel.cp import apply_context_parallel, local_objective, reduce_over_cp, set_sequence
from parallel.grad_buckets import GradBuckets
from parallel.optim import param_groups, warmup_cosine
from parallel.pipeline import make_schedule, split_for_pipeline
from parallel.topology import Topology


class Objective(Protocol):
    """(model outputs, targets) -> (loss to minimize, detached per-item statistic sums of length `stats_size`)."""

    stats_size: int

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    # context parallel: the part of a rank holding video tokens `video`, loss times `scale`, full-size statistics
    def sliced(self, video: slice, scale: float) -> "Objective": ...


class Engine(Protocol):
    module: nn.Module  # what this rank runs (its pipeline stage, its tensor-parallel shards)
    parallel_layout: dict[str, int]  # the parallel layout: tp, pp, dp, zero_stage
    supports_async_save: bool

    @property
    def lr(self) -> float: ...
    def set_batch(self, global_batch: int, micro_batch: int) -> None: ...
    def forward_backward(self, groups: list[tuple[list, Objective]]) -> tuple[torch.Tensor, list[torch.Tensor]]: ...
    def evaluate(self, micro: list, objective: Objective) -> torch.Tensor: ...
    def step(self) -> tuple[float, bool]: ...
    def state_dict(self) -> dict[str, Any]: ...  # small per-rank state (scheduler, optimizer hyper-parameters)
    # tensors by dense name, this rank's slices (parallel/dcp_format.py); a collective under DeepSpeed
    def checkpoint_tensors(self) -> dict[str, Any]: ...
    def checkpoint_targets(self, saved: dict[str, tuple[int, ...]]) -> dict[str, Any]: ...
    def load_checkpoint(self, tensors: dict[str, Any], state: dict[str, Any]) -> None: ...
    def shards_to_read(self, meta: dict) -> set[str]: ...
    def load(self, directory: Path, meta: dict, shards: dict[str, dict]) -> None: ...  # format 2
    def local_model_state(self) -> dict[str, torch.Tensor]: ...


def poison_if_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """`loss` for backward, times NaN when it is not finite. A loss can be inf while its gradients are finite (an
    inf constant term); NaN gradients make every engine skip the step by its non-finite gradient-norm rule, on every
    rank (the gradient reductions carry the NaN), with no host sync. Times 1.0 otherwise: gradients bit-identical."""
    scale = torch.ones_like(loss).masked_fill(~torch.isfinite(loss.detach()), float("nan"))
    return loss * scale


def optimizer_and_schedule(module: nn.Module, plan: ParallelPlan, tcfg, total_steps: int):
    """AdamW over the plan's weight-decay groups and the warmup-cosine LR schedule, built once per engine."""
    opt = torch.optim.AdamW(param_groups(module, tcfg.weight_decay, plan.no_weight_decay), lr=tcfg.lr,
                            betas=tuple(tcfg.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, tcfg.warmup_steps, total_steps, tcfg.min_lr_ratio))
    return opt, sched


def is_tp_shard(p: torch.Tensor) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def global_grad_norm(params: list[nn.Parameter], topo: Topology) -> torch.Tensor:
    """The model-parallel global gradient norm as a float64 tensor on the gradients' device (no host sync)."""
    grads = [p.grad.detach() for p in params if p.grad is not None and (is_tp_shard(p) or topo.tp_rank == 0)]
    device = grads[0].device if grads else (params[0].device if params else torch.device("cpu"))
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        sq += g.double().pow(2).sum()
    if topo.tp * topo.pp > 1:
        all_reduce(sq, model_parallel_group())
    return sq.sqrt()


def clip_global_grad_norm(params: list[nn.Parameter], max_norm: float, topo: Topology) -> float:
    """torch's clip_grad_norm_ formula over the whole (model-parallel) model: every tensor-parallel shard and
    every replicated parameter counted once; the squared norm is summed over the tp x pp group."""
    norm = float(global_grad_norm(params, topo))  # the step's one host sync
    if max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.detach().mul_(coef)
    return norm


def run_micro_batches(forward, micro: list, objective: Objective, backward=None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, summed statistics) over `micro`; `backward(loss)` after each micro-batch when training."""
    loss_sum = stats = 0
    for mb in micro:
        loss, mb_stats = objective(forward(mb), mb.targets)
        if backward is not None:
            backward(loss)
        loss_sum, stats = loss_sum + loss.detach(), stats + mb_stats  # on the loss's device
    return loss_sum / len(micro), stats


def combine_groups(results: list[tuple[torch.Tensor, torch.Tensor]], groups: list[tuple[list, Objective]]
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(mean loss over every micro-batch of the step, each group's statistic sums) from per-group results."""
    sizes = [len(micro) for micro, _ in groups]
    loss = sum(r[0] * n for r, n in zip(results, sizes)) / sum(sizes)
    return loss, [r[1] for r in results]


def clean_name(name: str) -> str:
    """The dense model's parameter name (drops the tensor-parallel `.layer` wrapper)."""
    return name.replace(".layer.", ".")


class TorchEngine:
    supports_async_save = True

    def __init__(self, model: nn.Module, plan: ParallelPlan, topo: Topology, pcfg: ParallelConfig, tcfg,
                 total_steps: int, device: torch.device):
        self.topo, self.pcfg, self.tcfg, self.device, self.plan = topo, pcfg, tcfg, device, plan
        self.model = model
        self.module: nn.Module = model
        if topo.pp > 1:
            blocks = pcfg.blocks_per_stage(len(getattr(model, plan.blocks)))
            self.module = split_for_pipeline(model, plan, blocks, topo.pp_rank)
        self.opt, self.sched = optimizer_and_schedule(self.module, plan, tcfg, total_steps)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        replicas = topo.dp * topo.cp  # ranks holding the same parameters: their gradients are averaged
        self.grad_buckets = None
        if replicas > 1:
            group = data_context_parallel_group() if topo.cp > 1 else data_parallel_group()
            self.grad_buckets = GradBuckets(self.params, group, replicas)
        self.parallel_layout = {"tp": topo.tp, "pp": topo.pp, "dp": topo.dp, "zero_stage": 0}
        if topo.cp > 1:
            self.parallel_layout["cp"] = topo.cp
            apply_context_parallel(model, plan, topo.cp, topo.cp_rank, context_parallel_group())
        self._schedules: dict = {}

    @property
    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def set_batch(self, global_batch: int, micro_batch: int) -> None:
        pass

    def _forward(self, mb) -> torch.Tensor:
        if self.topo.cp > 1:  # this rank's tokens of the micro-batch's sequence
            set_sequence(self.model, mb.static.length, self.topo.cp, self.topo.cp_rank)
        with autocast(self.tcfg.precision, self.device):
            return self.model(*mb.model_args())

    def forward_backward(self, groups: list[tuple[list, Objective]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Backward of the mean loss over every micro-batch of `groups`; returns (mean loss, per-group statistic
        sums)."""
        self.module.train()
        self.opt.zero_grad(set_to_none=True)
        total = sum(len(micro) for micro, _ in groups)
        if self.topo.pp > 1:
            return combine_groups([self._pipeline(micro, obj, total=total) for micro, obj in groups], groups)
        done = []

        def backward(loss: torch.Tensor) -> None:
            done.append(1)
            if self.grad_buckets is not None and len(done) == total:
                self.grad_buckets.arm()  # the last micro-batch: reduce buckets while backward runs
            (poison_if_nonfinite(loss) / total).backward()

        loss, stats = combine_groups([run_micro_batches(self._forward, micro, self._local(obj, micro), backward)
                                      for micro, obj in groups], groups)
        return self._over_cp(loss, stats)

    def evaluate(self, micro: list, objective: Objective) -> torch.Tensor:
        """Forward only: statistic sums over `micro` (shared with the whole pipeline group under pp)."""
        self.module.eval()
        if self.topo.pp > 1:
            return self._pipeline(micro, objective, train=False)[1]
        with torch.no_grad():
            stats = run_micro_batches(self._forward, micro, self._local(objective, micro))[1]
        return self._over_cp(torch.zeros(()), [stats])[1][0]

    def _local(self, objective: Objective, micro: list) -> Objective:
        return local_objective(objective, micro, self.topo.cp, self.topo.cp_rank)

    def _over_cp(self, loss: torch.Tensor, stats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        group = context_parallel_group() if self.topo.cp > 1 else None
        return reduce_over_cp(loss, stats, self.topo.cp, group)

    def _pipeline(self, micro: list, objective: Objective, train: bool = True, total: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """One schedule run over `micro` (one shape). The loss is divided by `total`, the step's micro-batches over
        all groups (the schedule itself does not rescale: `scale_grads=False`), so groups accumulate."""
        n, static = len(micro), micro[0].static
        total = total or n
        self.module.static = static
        key = (static, n, len(micro[0]))
        stats = []

        def loss_fn(outputs, targets):
            loss, mb_stats = objective(outputs, targets)
            stats.append((loss.detach(), mb_stats))
            return poison_if_nonfinite(loss) / total

        if key not in self._schedules:  # shapes change with the curriculum stage: one schedule per shape
            self._schedules[key] = make_schedule(self.module, pipeline_group(), self.device, n, loss_fn,
                                                 self.pcfg.pp_schedule)
        schedule = self._schedules[key]
        schedule._loss_fn = loss_fn
        run = schedule.step if train else schedule.eval  # eval: forward only
        if self.topo.is_first_stage:
            args = [mb.stage_args() for mb in micro]
            run(*(torch.cat(column) for column in zip(*args)))
        elif self.topo.is_last_stage:
            run(target=torch.cat([mb.targets for mb in micro]).float(), losses=[])
        else:
            run()
        # a new schedule's first step also runs the loss once on placeholder tensors (shape inference): keep the
        # last n, the real micro-batches
        stats = stats[-n:]
        if self.topo.is_last_stage and len(stats) != n:
            raise RuntimeError(f"pipeline schedule computed {len(stats)} losses for {n} micro-batches")
        if stats:
            loss, summed = torch.stack([s[0] for s in stats]).mean(), sum(s[1] for s in stats)
        else:
            loss, summed = torch.zeros((), device=self.device), torch.zeros(objective.stats_size, device=self.device)
        # the last stage has the loss: share it with the whole pipeline group (the others contribute zeros)
        loss, summed = all_reduce_packed([loss, summed], pipeline_group())
        return loss, summed

    def step(self) -> tuple[float, bool]:
        """(global grad norm, whether the update was applied)."""
        if self.grad_buckets is not None:
            self.grad_buckets.reduce()
        norm = clip_global_grad_norm(self.params, self.tcfg.grad_clip, self.topo)
        if not math.isfinite(norm):
            self.opt.zero_grad(set_to_none=True)
            return norm, False
        self.opt.step()
        self.sched.step()
        return norm, True

    # -- checkpoints: by (dense) parameter name, so any layout can reload them ---------------------------------
    def state_dict(self) -> dict[str, Any]:
        hparams = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        return {"optim_hparams": hparams, "scheduler": self.sched.state_dict()}

    def _slice(self, name: str, local: torch.Tensor) -> Any:
        return tp_slice(name, local, self.plan.tp_split, self.topo.tp, self.topo.tp_rank)

    def checkpoint_tensors(self) -> dict[str, Any]:
        out = {}
        for name, p in self.module.named_parameters():
            n = clean_name(name)
            out[f"model/{n}"] = self._slice(n, p.detach())
            for k, v in self.opt.state.get(p, {}).items():
                out[f"optim/{n}/{k}"] = self._slice(n, v) if k in fmt.MOMENTS else v
        return out

    def checkpoint_targets(self, saved: dict[str, tuple[int, ...]]) -> dict[str, Any]:
        """Where `load_checkpoint` wants the saved tensors: the parameters themselves, fresh AdamW moments."""
        out = {}
        for name, p in self.module.named_parameters():
            n = clean_name(name)
            out[f"model/{n}"] = self._slice(n, p.detach())
            if f"optim/{n}/step" in saved:
                out[f"optim/{n}/step"] = torch.zeros(saved[f"optim/{n}/step"])  # AdamW keeps it on the CPU
                for k in fmt.MOMENTS:
                    out[f"optim/{n}/{k}"] = self._slice(n, torch.zeros_like(p, memory_format=torch.contiguous_format))
        return out

    def load_checkpoint(self, tensors: dict[str, Any], state: dict[str, Any]) -> None:
        for name, p in self.module.named_parameters():
            n = clean_name(name)
            if f"optim/{n}/step" in tensors:
                self.opt.state[p] = {k: local_tensor(tensors[f"optim/{n}/{k}"]) for k in ("step",) + fmt.MOMENTS}
        self._load_schedule(state["optim_hparams"], state["scheduler"])

    def _load_schedule(self, hparams: list[dict], scheduler: dict) -> None:
        if len(hparams) != len(self.opt.param_groups):
            raise ValueError(f"checkpoint has {len(hparams)} optimizer groups, this model {len(self.opt.param_groups)}")
        for group, h in zip(self.opt.param_groups, hparams):
            group.update(h)
        self.sched.load_state_dict(scheduler)

    def shards_to_read(self, meta: dict) -> set[str]:
        return fmt.model_shards(meta)

    def load(self, directory: Path, meta: dict, shards: dict[str, dict]) -> None:
        """Rebuild this rank's slices from the full state the saved layout's shards hold together."""
        saved = meta.get("layout", fmt.SINGLE)
        if saved["zero_stage"] != 0:
            raise fmt.layout_mismatch(directory, saved, self.parallel_layout)
        split = meta.get("tp_split", self.plan.tp_split)
        by_rank = {fmt.shard_rank(name): shards[name] for name in fmt.model_shards(meta)}
        model, optim = fmt.assemble(by_rank, saved, split)
        first = by_rank[0]
        try:
            self._load_full_state(model, optim, first["optim_hparams"], first["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"{directory}: does not fit this model/optimizer ({str(e).splitlines()[0]})") from None

    def _load_full_state(self, model: dict[str, torch.Tensor], optim: dict[str, dict], hparams: list[dict],
                         scheduler: dict) -> None:
        tp, tp_rank, split = self.topo.tp, self.topo.tp_rank, self.plan.tp_split
        missing = [clean_name(n) for n, _ in self.module.named_parameters() if clean_name(n) not in model]
        if missing:
            raise ValueError(f"checkpoint lacks parameters {missing[:3]}")
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                n = clean_name(name)
                value = fmt.local_slice(n, model[n], tp, tp_rank, split)
                if value.shape != p.shape:
                    raise ValueError(f"{n}: checkpoint slice {tuple(value.shape)} vs model {tuple(p.shape)}")
                p.copy_(value)
                if n in optim:
                    # moments onto the parameter's device (what Optimizer.load_state_dict casts); `step` stays
                    # a CPU tensor, as AdamW keeps it when not capturable/fused
                    self.opt.state[p] = {k: (fmt.local_slice(n, v, tp, tp_rank, split).to(p.device, copy=True)
                                             if k in fmt.MOMENTS else v.clone()) for k, v in optim[n].items()}
        self._load_schedule(hparams, scheduler)

    def local_model_state(self) -> dict[str, torch.Tensor]:
        """This rank's parameters (its tensor-parallel shards, its pipeline stage), dense names."""
        return {clean_name(k): v.detach().clone() for k, v in self.module.state_dict().items()
                if torch.is_tensor(v)}
