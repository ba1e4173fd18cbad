"""VideoAR training on a Ray cluster with Ray Train: the same trainer and parallel layout, one Ray Train worker
per rank (Ray Train sets up torch.distributed; megatron-core groups are built on top of it).

    python -m jobs.ray_train --workers 2 --config configs/demo.yaml [key.sub=value ...]

Usually started through `python -m jobs.ray submit train ...` (the Jobs API). Checkpoints go to <run.dir> as
always (shared storage on a cluster); a worker failure restarts the group (FailureConfig), and the restarted
trainer resumes from the newest committed checkpoint.
"""

from __future__ import annotations

import sys

from common.config import config_arg_parser, config_from_args, config_from_dict, config_to_dict
from trainer.train_videoar import VideoARTrainer


def _train_loop(config: dict) -> None:
    cfg = config_from_dict(config["cfg"])
    import ray

    trainer = VideoARTrainer(cfg, progress=False)
    run = trainer.train()
    print(f"ray train worker done: rank {trainer.topo.rank} on node {ray.util.get_node_ip_address()}, step "
          f"{run.step}, resumed from {run.start_step}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = config_arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers = training ranks")
    parser.add_argument("--max-failures", type=int, default=3, help="worker-group restarts before giving up")
    parser.add_argument("--placement", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"), default="PACK",
                        help="Ray placement of the workers (STRICT_SPREAD: one per node)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, parser)
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(address="auto", log_to_driver=True)
    trainer = TorchTrainer(
        _train_loop, train_loop_config={"cfg": config_to_dict(cfg)},
        torch_config=TorchConfig(backend="nccl" if cfg.run.device == "cuda" else "gloo"),
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=cfg.run.device == "cuda",
                                     placement_strategy=args.placement),
        run_config=RunConfig(name="videoar", storage_path=str(cfg.run_dir.resolve() / "ray"),
                             failure_config=FailureConfig(max_failures=args.max_failures)))
    trainer.fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
