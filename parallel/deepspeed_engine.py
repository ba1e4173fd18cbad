"""The DeepSpeed ZeRO 1/2/3 engine (pp = 1, any tp) behind the `Engine` interface of parallel/engine.py:
`deepspeed.initialize` with a config built from our YAML (there is no separate DeepSpeed JSON); the curriculum's
batch sizes are pushed with its public setters. Checkpoints hold the fp32 master weights and AdamW moments by
dense parameter name in the DCP directory every engine writes (parallel/dcp_format.py), gathered per parameter with
DeepSpeed's `safe_get_full_*` API and loaded with `safe_set_full_*`: a ZeRO 1-3 run resumes under any other layout
(or the ZeRO-0 engine), and vice versa. Format-2 checkpoints (DeepSpeed's own files) resume on their layout."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.job_config import ParallelConfig
from common.parallel_plan import ParallelPlan
from common.precision import autocast_dtype
from parallel import checkpoint_format as fmt
from parallel.safe_load import WeightsOnlyCheckpointEngine
from parallel.engine import Objective, clean_name, combine_groups, optimizer_and_schedule, poison_if_nonfinite
from parallel.engine import run_micro_batches
from parallel.collectives import context_parallel_group
from parallel.dcp_format import local_tensor, tp_slice
from parallel.cp import apply_context_parallel, local_objective, reduce_over_cp, set_sequence
from parallel.topology import Topology


class MegatronMPU:
    """The `mpu` interface DeepSpeed asks for, answered by megatron-core's parallel_state (tensor parallel =
    DeepSpeed's "model parallel"; with cp > 1 context parallel = its "sequence parallel", ZeRO partitions and
    reduces over dp x cp). DeepSpeed probes the sequence functions with hasattr: without cp they do not exist."""

    def __init__(self, cp: int = 1):
        self.__dict__["cp"] = cp

    def __getattr__(self, name: str):
        from megatron.core import parallel_state as ps

        mapping = {"get_model_parallel_rank": ps.get_tensor_model_parallel_rank,
                   "get_model_parallel_world_size": ps.get_tensor_model_parallel_world_size,
                   "get_model_parallel_group": ps.get_tensor_model_parallel_group}
        if self.cp > 1:
            mapping.update({
                "get_sequence_parallel_world_size": ps.get_context_parallel_world_size,
                "get_sequence_parallel_rank": ps.get_context_parallel_rank,
                "get_sequence_parallel_group": ps.get_context_parallel_group,
                "get_sequence_data_parallel_group": lambda: ps.get_data_parallel_group(with_context_parallel=True),
                "get_sequence_data_parallel_world_size":
                    lambda: ps.get_data_parallel_world_size(with_context_parallel=True),
                "get_sequence_data_parallel_rank": lambda: ps.get_data_parallel_rank(with_context_parallel=True)})
        if name in mapping:
            return mapping[name]
        return getattr(ps, name)


def deepspeed_config(pcfg: ParallelConfig, tcfg, topo: Topology, global_batch: int, micro_batch: int,
                     device: str, width: int) -> dict:
    """The whole DeepSpeed config, from our YAML sections."""
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
        "bf16": {"enabled": device == "cuda" and autocast_dtype(tcfg.precision, device) is not None},
        # bf16 parameters; gradients accumulated over micro-batches in parallel.grad_accum_dtype (fp32 by default:
        # ZeRO-1 then runs DeepSpeed's BF16_Optimizer, ZeRO-2/3 reduce into fp32 partitions) and reduced in fp32
        "data_types": {"grad_accum_dtype": pcfg.grad_accum_dtype},
        "communication_data_type": "fp32",
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    supports_async_save = False

    def __init__(self, model: nn.Module, plan: ParallelPlan, topo: Topology, pcfg: ParallelConfig, tcfg,
                 total_steps: int, device: torch.device, global_batch: int, micro_batch: int):
        import deepspeed
        import deepspeed.ops

        if device.type == "cpu":  # its shared-memory op compiles for ~40 s at first use and is not needed on CPU
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.topo, self.tcfg, self.device, self.model, self.plan = topo, tcfg, device, model, plan
        opt, sched = optimizer_and_schedule(model, plan, tcfg, total_steps)
        self.engine, self.opt, _, self.sched = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, mpu=MegatronMPU(topo.cp),
            config=deepspeed_config(pcfg, tcfg, topo, global_batch, micro_batch, device.type, plan.hidden_size))
        self.module = self.engine.module
        self.engine.checkpoint_engine = WeightsOnlyCheckpointEngine(self.engine.checkpoint_engine)  # untrusted files
        self.parallel_layout = {"tp": topo.tp, "pp": topo.pp, "dp": topo.dp, "zero_stage": pcfg.zero_stage}
        if topo.cp > 1:
            self.parallel_layout["cp"] = topo.cp
            apply_context_parallel(model, plan, topo.cp, topo.cp_rank, context_parallel_group())

    @property
    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def set_batch(self, global_batch: int, micro_batch: int) -> None:
        if (global_batch, micro_batch) != (self.engine.train_batch_size(), self.engine.train_micro_batch_size_per_gpu()):
            self.engine.set_train_micro_batch_size(micro_batch)
            self.engine.set_train_batch_size(global_batch)

    def forward_backward(self, groups: list[tuple[list, Objective]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        total = sum(len(micro) for micro, _ in groups)
        if total != self.engine.gradient_accumulation_steps():
            raise RuntimeError(f"{total} micro-batches but DeepSpeed accumulates "
                               f"{self.engine.gradient_accumulation_steps()}")
        self.engine.train()
        self._skipped_before = self.engine.skipped_steps

        def backward(loss: torch.Tensor) -> None:
            self.engine.backward(poison_if_nonfinite(loss))  # scaled by 1/accumulation inside
            self.engine.step()  # updates only at the accumulation boundary

        loss, stats = combine_groups([run_micro_batches(self._forward, micro, self._local(obj, micro), backward)
                                      for micro, obj in groups], groups)
        return self._over_cp(loss, stats)

    def _forward(self, mb) -> torch.Tensor:
        if self.topo.cp > 1:  # this rank's tokens of the micro-batch's sequence
            set_sequence(self.model, mb.static.length, self.topo.cp, self.topo.cp_rank)
        return self.engine(*mb.model_args())

    # DeepSpeed sums gradients over its sequence-parallel ranks and averages over dp: a rank's loss share is 1/cp
    # of what our engine uses
    def _local(self, objective: Objective, micro: list) -> Objective:
        return local_objective(objective, micro, self.topo.cp, self.topo.cp_rank, share=1 / self.topo.cp)

    def _over_cp(self, loss: torch.Tensor, stats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        group = context_parallel_group() if self.topo.cp > 1 else None
        return reduce_over_cp(loss, stats, self.topo.cp, group, share=1 / self.topo.cp)

    def evaluate(self, micro: list, objective: Objective) -> torch.Tensor:
        """Forward only (ZeRO-3 gathers the parameters as in training): statistic sums."""
        self.engine.eval()
        with torch.no_grad():
            stats = run_micro_batches(self._forward, micro, self._local(objective, micro))[1]
        return self._over_cp(torch.zeros(()), [stats])[1][0]

    def step(self) -> tuple[float, bool]:
        """The update already happened at the accumulation boundary; DeepSpeed itself skips a step with a
        non-finite gradient norm (and its LR schedule step) and counts it in `skipped_steps`."""
        norm = self.engine.get_global_grad_norm()
        applied = self.engine.skipped_steps == self._skipped_before
        return (float(norm) if norm is not None else float("nan")), applied

    def state_dict(self) -> dict[str, Any]:
        hparams = [{k: v for k, v in g.items() if k != "params"} for g in self.engine.optimizer.param_groups]
        return {"optim_hparams": hparams, "scheduler": self.sched.state_dict()}

    def _named(self) -> list[tuple[str, nn.Parameter]]:
        return [(clean_name(n), p) for n, p in self.module.named_parameters()]

    def _slice(self, name: str, full_local: torch.Tensor) -> Any:
        return tp_slice(name, full_local, self.plan.tp_split, self.topo.tp, self.topo.tp_rank)

    def _step_value(self) -> torch.Tensor:
        states = list(self.engine.optimizer.optimizer.state.values())
        return torch.as_tensor(states[0]["step"] if states else 0, dtype=torch.float32).cpu().clone()

    def _link_optimizer_states(self, create: bool) -> bool:
        """Whether AdamW has state for ZeRO's flat fp32 partitions (it creates it at the first step; `create`
        makes zero state as that step would), linked to the parameters' fragments (DeepSpeed does it after its
        first step) so `safe_*_full_optimizer_state` see it."""
        zero, base = self.engine.optimizer, self.engine.optimizer.optimizer
        # ZeRO-3 keeps its flat fp32 partitions out of AdamW's param_groups between steps
        flat = getattr(zero, "fp32_partitioned_groups_flat", None) or [p for g in base.param_groups for p in g["params"]]
        if create:
            for p in flat:
                if not base.state.get(p):
                    base.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                     "exp_avg_sq": torch.zeros_like(p)}
        if not all(base.state.get(p) for p in flat):
            return False
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2, BF16_Optimizer
            # DeepSpeed links right after stepping its first parameter group, before the others have state
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()
        return True

    def checkpoint_tensors(self) -> dict[str, Any]:
        """Full fp32 weights and moments, one parameter at a time (DeepSpeed all-gathers each over dp); a rank
        keeps every dp-th parameter, so the dp ranks write disjoint parts and none holds the whole state."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        out, step, moments = {}, self._step_value(), self._link_optimizer_states(create=False)
        for i, (n, p) in enumerate(self._named()):
            full = {"model": safe_get_full_fp32_param(p)}
            full.update({k: safe_get_full_optimizer_state(p, k) if moments else None for k in fmt.MOMENTS})
            if i % self.topo.dp != self.topo.dp_rank:
                continue
            out[f"model/{n}"] = self._slice(n, full["model"].detach().float().cpu())
            if full[fmt.MOMENTS[0]] is not None:
                out[f"optim/{n}/step"] = step
                out.update({f"optim/{n}/{k}": self._slice(n, full[k].detach().float().cpu()) for k in fmt.MOMENTS})
        return out

    def checkpoint_targets(self, saved: dict[str, tuple[int, ...]]) -> dict[str, Any]:
        out = {}
        for n, p in self._named():
            shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 parameters are partitioned (p.shape is 0)
            keys = ["model"] + ([f"optim/{n}/{k}" for k in fmt.MOMENTS] if f"optim/{n}/step" in saved else [])
            for key in keys:
                out[key if key != "model" else f"model/{n}"] = self._slice(n, torch.zeros(shape))
            if f"optim/{n}/step" in saved:
                out[f"optim/{n}/step"] = torch.zeros(())
        return out

    def load_checkpoint(self, tensors: dict[str, Any], state: dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._link_optimizer_states(create=any(k.startswith("optim/") for k in tensors))
        for n, p in self._named():
            value = local_tensor(tensors[f"model/{n}"])
            safe_set_full_fp32_param(p, value)
            with _full(p):
                p.data.copy_(value.to(p.dtype))  # the module's (low-precision) copy
            if f"optim/{n}/step" in tensors:
                for k in fmt.MOMENTS:
                    safe_set_full_optimizer_state(p, local_tensor(tensors[f"optim/{n}/{k}"]), k)
        steps = [v for k, v in tensors.items() if k.endswith("/step")]
        for st in self.engine.optimizer.optimizer.state.values():
            if steps and "step" in st:
                st["step"] = steps[0].clone() if torch.is_tensor(st["step"]) else int(steps[0])
        for group, h in zip(self.engine.optimizer.param_groups, state["optim_hparams"]):
            group.update(h)
        self.sched.load_state_dict(state["scheduler"])

    def shards_to_read(self, meta: dict) -> set[str]:
        return set()

    def load(self, directory: Path, meta: dict, shards: dict[str, dict]) -> None:
        """A format-2 checkpoint: DeepSpeed's own files, same layout only."""
        saved = meta.get("layout", fmt.SINGLE)
        if saved != self.parallel_layout:
            raise fmt.layout_mismatch(directory, saved, self.parallel_layout)
        self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state")

    def local_model_state(self) -> dict[str, torch.Tensor]:
        """This rank's parameters, complete even under ZeRO-3, dense names."""
        params = list(self.module.parameters())
        if self.engine.zero_optimization_stage() == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return _dense_state(self.module)
        return _dense_state(self.module)


def _full(p: nn.Parameter):
    """The whole parameter inside the block (ZeRO-3 gathers it and re-partitions rank 0's value after)."""
    if hasattr(p, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([p], modifier_rank=0)
    return contextlib.nullcontext()


def _dense_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {clean_name(k): v.detach().clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}
