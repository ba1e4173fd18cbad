"""Training engines: how one optimizer step's micro-batches become gradients and an update, per layout.

- `TorchEngine`: one process, or any dp x pp x tp with ZeRO stage 0: megatron-core tensor-parallel layers,
  torch.distributed.pipelining stages, gradients averaged over the data-parallel group, the global grad norm
  summed over the model-parallel group (each tensor-parallel shard once, replicated parameters once).
- `DeepSpeedEngine`: ZeRO stage 1/2/3 data parallelism (pp = 1, any tp) through `deepspeed.initialize` with a
  config built from our YAML; the curriculum's batch sizes are pushed with its public setters.
Both return the local mean loss and per-token loss/accuracy sums, so the trainer logs the same metrics for all.
A step whose global gradient norm is not finite is skipped (Megatron's rule; a non-finite loss is made to give
NaN gradients, `trainer.objective.poison_if_nonfinite`, so it counts too): no update, the LR schedule does
not advance, gradients are dropped; `step()` says whether the update was applied. The norm is reduced over the
whole model, so every rank takes the same decision.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from models.layout import SequenceLayout
from models.videoar import VideoAR
from parallel.config import ParallelConfig
from parallel.pipeline import make_schedule, split_for_pipeline
from parallel.topology import Topology
from trainer.objective import MicroBatch, bit_loss, poison_if_nonfinite, scale_loss_weights
from trainer.schedules import param_groups, warmup_cosine


def _groups():
    from megatron.core import parallel_state as ps

    return ps


def is_tp_shard(p: torch.Tensor) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def clip_global_grad_norm(params: list[nn.Parameter], max_norm: float, topo: Topology) -> float:
    """torch's clip_grad_norm_ formula over the whole (model-parallel) model: every tensor-parallel shard and
    every replicated parameter counted once; the squared norm is summed over the tp x pp group."""
    sq = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is not None and (is_tp_shard(p) or topo.tp_rank == 0):
            sq += p.grad.detach().double().pow(2).sum()
    if topo.tp * topo.pp > 1:
        dist.all_reduce(sq, group=_groups().get_model_parallel_group())
    norm = float(sq.sqrt())
    if max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.detach().mul_(coef)
    return norm


def lr_lambda(t, total: int):
    return lambda s: warmup_cosine(s, t.warmup_steps, total, t.min_lr_ratio)


class TorchEngine:
    def __init__(self, model: VideoAR, topo: Topology, pcfg: ParallelConfig, tcfg, total_steps: int,
                 device: torch.device):
        self.topo, self.pcfg, self.tcfg, self.device = topo, pcfg, tcfg, device
        self.model = model
        self.module: nn.Module = model
        if topo.pp > 1:
            self.module = split_for_pipeline(model, pcfg.blocks_per_stage(model.cfg.depth), topo.pp_rank)
        self.opt = torch.optim.AdamW(param_groups(self.module, tcfg.weight_decay), lr=tcfg.lr,
                                     betas=tuple(tcfg.betas))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(tcfg, total_steps))
        self._schedules: dict = {}

    @property
    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def forward_backward(self, micro: list[MicroBatch], layout: SequenceLayout) -> tuple[torch.Tensor, ...]:
        """Backward of the mean loss over `micro`; returns (mean loss, token loss sums, token correct sums)."""
        self.module.train()
        self.opt.zero_grad(set_to_none=True)
        if self.topo.pp > 1:
            return self._pipeline(micro, layout)
        autocast = self.tcfg.precision == "bf16"
        weights = scale_loss_weights(layout, self.tcfg.scale_loss_weight)
        loss_sum, tl, tc = torch.zeros(()), 0, 0
        for mb in micro:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = self.model(mb.cond, mb.features, layout, mb.mask, mb.drop)
            loss, token_loss, token_correct = bit_loss(logits, mb.targets, weights)
            (poison_if_nonfinite(loss) / len(micro)).backward()
            loss_sum, tl, tc = loss_sum + loss.detach(), tl + token_loss, tc + token_correct
        return loss_sum / len(micro), tl, tc

    def evaluate(self, micro: list[MicroBatch], layout: SequenceLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward only: per-token sums over `micro` of the bit loss and of the correct bits (shared with the
        whole pipeline group under pp)."""
        self.module.eval()
        if self.topo.pp > 1:
            return self._pipeline(micro, layout, train=False)[1:]
        tl, tc = 0, 0
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                             enabled=self.tcfg.precision == "bf16"):
            for mb in micro:
                _, token_loss, token_correct = bit_loss(self.model(mb.cond, mb.features, layout, mb.mask, mb.drop),
                                                        mb.targets)
                tl, tc = tl + token_loss, tc + token_correct
        return tl, tc

    def _pipeline(self, micro: list[MicroBatch], layout: SequenceLayout, train: bool = True
                  ) -> tuple[torch.Tensor, ...]:
        n = len(micro)
        self.module.layout = layout
        key = (layout, n, len(micro[0]))
        stats = []
        weights = scale_loss_weights(layout, self.tcfg.scale_loss_weight)

        def loss_fn(logits, targets):
            loss, token_loss, token_correct = bit_loss(logits, targets.bool(), weights)
            stats.append((loss.detach(), token_loss, token_correct))
            return poison_if_nonfinite(loss)

        if key not in self._schedules:  # shapes change with the curriculum stage: one schedule per shape
            self._schedules[key] = make_schedule(self.module, _groups().get_pipeline_model_parallel_group(),
                                                 self.device, n, loss_fn, self.pcfg.pp_schedule)
        schedule = self._schedules[key]
        schedule._loss_fn = loss_fn
        cat = lambda name: torch.cat([getattr(m, name) for m in micro])  # noqa: E731
        mask = torch.cat([m.mask if m.mask is not None else self.model.tensors(layout).mask.expand(len(m), -1, -1)
                          for m in micro])
        run = schedule.step if train else schedule.eval  # eval: forward only
        if self.topo.is_first_stage:
            run(cat("features"), cat("cond"), cat("drop").float(), mask.float())
        elif self.topo.is_last_stage:
            run(target=cat("targets").float(), losses=[])
        else:
            run()
        lv, d = micro[0].targets.shape[1:]
        # a new schedule's first step also runs the loss once on placeholder tensors (shape inference): keep the
        # last n, the real micro-batches
        stats = stats[-n:]
        if self.topo.is_last_stage and len(stats) != n:
            raise RuntimeError(f"pipeline schedule computed {len(stats)} losses for {n} micro-batches")
        if stats:
            loss = torch.stack([s[0] for s in stats]).mean()
            tl, tc = sum(s[1] for s in stats), sum(s[2] for s in stats)
        else:
            loss, tl, tc = torch.zeros(()), torch.zeros(lv), torch.zeros(lv)
        # the last stage has the loss: share it with the whole pipeline group (the others contribute zeros)
        packed = torch.cat([loss.view(1), tl, tc])
        dist.all_reduce(packed, group=_groups().get_pipeline_model_parallel_group())
        return packed[0], packed[1:1 + lv], packed[1 + lv:]

    def step(self) -> tuple[float, bool]:
        """(global grad norm, whether the update was applied)."""
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if self.topo.dp > 1:
            group = _groups().get_data_parallel_group()
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=group)
                    p.grad.div_(self.topo.dp)
        norm = clip_global_grad_norm(params, self.tcfg.grad_clip, self.topo)
        if not math.isfinite(norm):
            self.opt.zero_grad(set_to_none=True)
            return norm, False
        self.opt.step()
        self.sched.step()
        return norm, True

    def set_batch(self, global_batch: int, micro_batch: int) -> None:
        pass

    def state_dict(self) -> dict:
        """Model and AdamW state by (dense) parameter name, so any layout can reload it (parallel.reshard)."""
        names = {id(p): clean_name(n) for n, p in self.module.named_parameters()}
        optim = {names[id(p)]: dict(self.opt.state[p]) for g in self.opt.param_groups for p in g["params"]
                 if p in self.opt.state}
        hparams = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        return {"model": {names[id(p)]: p.detach() for _, p in self.module.named_parameters()}, "optim": optim,
                "optim_hparams": hparams, "scheduler": self.sched.state_dict()}

    def load_full_state(self, model: dict[str, torch.Tensor], optim: dict[str, dict], hparams: list[dict],
                        scheduler: dict) -> None:
        """Take this rank's slices of full (layout-independent) model and optimizer state."""
        from parallel.reshard import local_slice

        tp, tp_rank = self.topo.tp, self.topo.tp_rank
        missing = [clean_name(n) for n, _ in self.module.named_parameters() if clean_name(n) not in model]
        if missing:
            raise ValueError(f"checkpoint lacks parameters {missing[:3]}")
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                n = clean_name(name)
                value = local_slice(n, model[n], tp, tp_rank)
                if value.shape != p.shape:
                    raise ValueError(f"{n}: checkpoint slice {tuple(value.shape)} vs model {tuple(p.shape)}")
                p.copy_(value)
                if n in optim:
                    self.opt.state[p] = {k: (local_slice(n, v, tp, tp_rank).clone() if k in ("exp_avg", "exp_avg_sq")
                                             else v.clone()) for k, v in optim[n].items()}
        if len(hparams) != len(self.opt.param_groups):
            raise ValueError(f"checkpoint has {len(hparams)} optimizer groups, this model {len(self.opt.param_groups)}")
        for group, h in zip(self.opt.param_groups, hparams):
            group.update(h)
        self.sched.load_state_dict(scheduler)


def clean_name(name: str) -> str:
    """The dense model's parameter name (drops the tensor-parallel `.layer` wrapper)."""
    return name.replace(".layer.", ".")


class MegatronMPU:
    """The `mpu` interface DeepSpeed asks for, answered by megatron-core's parallel_state (tensor parallel =
    DeepSpeed's "model parallel")."""

    def __getattr__(self, name: str):
        ps = _groups()
        mapping = {"get_model_parallel_rank": ps.get_tensor_model_parallel_rank,
                   "get_model_parallel_world_size": ps.get_tensor_model_parallel_world_size,
                   "get_model_parallel_group": ps.get_tensor_model_parallel_group}
        if name in mapping:
            return mapping[name]
        return getattr(ps, name)


def deepspeed_config(pcfg: ParallelConfig, tcfg, topo: Topology, global_batch: int, micro_batch: int,
                     device: str, width: int) -> dict:
    """The whole DeepSpeed config, from our YAML sections (there is no separate DeepSpeed JSON)."""
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": global_batch // (micro_batch * topo.dp),
        "gradient_clipping": float(tcfg.grad_clip),  # set explicitly: DeepSpeed's default is 1.0
        # bucket sizes scaled to the model (DeepSpeed's defaults reserve up to 5e8 elements, 2 GB in fp32)
        "zero_optimization": {"stage": pcfg.zero_stage, "reduce_bucket_size": width * width,
                              "allgather_bucket_size": width * width,
                              "stage3_prefetch_bucket_size": int(0.9 * width * width),
                              "stage3_param_persistence_threshold": 10 * width},
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW as the client optimizer
        "bf16": {"enabled": tcfg.precision == "bf16" and device == "cuda"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    def __init__(self, model: VideoAR, topo: Topology, pcfg: ParallelConfig, tcfg, total_steps: int,
                 device: torch.device, global_batch: int, micro_batch: int):
        import deepspeed
        import deepspeed.ops

        if device.type == "cpu":  # its shared-memory op compiles for ~40 s at first use and is not needed on CPU
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.topo, self.tcfg, self.device, self.model = topo, tcfg, device, model
        opt = torch.optim.AdamW(param_groups(model, tcfg.weight_decay), lr=tcfg.lr, betas=tuple(tcfg.betas))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tcfg, total_steps))
        self.engine, self.opt, _, self.sched = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, mpu=MegatronMPU(),
            config=deepspeed_config(pcfg, tcfg, topo, global_batch, micro_batch, device.type, model.cfg.width))
        self.module = self.engine.module

    @property
    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def set_batch(self, global_batch: int, micro_batch: int) -> None:
        if (global_batch, micro_batch) != (self.engine.train_batch_size(), self.engine.train_micro_batch_size_per_gpu()):
            self.engine.set_train_micro_batch_size(micro_batch)
            self.engine.set_train_batch_size(global_batch)

    def forward_backward(self, micro: list[MicroBatch], layout: SequenceLayout) -> tuple[torch.Tensor, ...]:
        if len(micro) != self.engine.gradient_accumulation_steps():
            raise RuntimeError(f"{len(micro)} micro-batches but DeepSpeed accumulates "
                               f"{self.engine.gradient_accumulation_steps()}")
        self.engine.train()
        self._skipped_before = self.engine.skipped_steps
        loss_sum, tl, tc = torch.zeros(()), 0, 0
        weights = scale_loss_weights(layout, self.tcfg.scale_loss_weight)
        for mb in micro:
            logits = self.engine(mb.cond, mb.features, layout, mb.mask, mb.drop)
            loss, token_loss, token_correct = bit_loss(logits, mb.targets, weights)
            self.engine.backward(poison_if_nonfinite(loss))  # scaled by 1/accumulation inside
            self.engine.step()  # updates only at the accumulation boundary
            loss_sum, tl, tc = loss_sum + loss.detach(), tl + token_loss, tc + token_correct
        return loss_sum / len(micro), tl, tc

    def evaluate(self, micro: list[MicroBatch], layout: SequenceLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward only (ZeRO-3 gathers the parameters as in training): per-token loss and correct-bit sums."""
        self.engine.eval()
        tl, tc = 0, 0
        with torch.no_grad():
            for mb in micro:
                _, token_loss, token_correct = bit_loss(self.engine(mb.cond, mb.features, layout, mb.mask, mb.drop),
                                                        mb.targets)
                tl, tc = tl + token_loss, tc + token_correct
        return tl, tc

    def step(self) -> tuple[float, bool]:
        """The update already happened at the accumulation boundary; DeepSpeed itself skips a step with a
        non-finite gradient norm (and its LR schedule step) and counts it in `skipped_steps`."""
        norm = self.engine.get_global_grad_norm()
        applied = self.engine.skipped_steps == self._skipped_before
        return (float(norm) if norm is not None else float("nan")), applied

    def state_dict(self) -> dict:
        raise NotImplementedError("DeepSpeed engines save with their own save_checkpoint (trainer/videoar_checkpoints.py)")


def local_state_dict(engine) -> dict[str, torch.Tensor]:
    """This rank's model parameters (its tensor-parallel shards, its pipeline stage), complete even under
    ZeRO-3, named like the dense model's (the parallel layers' `.layer` wrapper dropped)."""
    module = engine.module
    if isinstance(engine, DeepSpeedEngine) and engine.engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}
    else:
        state = {k: v.detach().clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}
    return {clean_name(k): v for k, v in state.items()}
