"""The Ray runtime the preprocessing job runs on: the configured cluster (`preprocess.ray_address`), or an
embedded single-node runtime that listens on loopback only."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_only_ray() -> Iterator[None]:
    """Make the embedded single-node Ray runtime started inside this block listen on loopback only. Ray turns
    `_node_ip_address="127.0.0.1"` into the machine's reachable address (`services.resolve_ip_for_localhost`),
    and its GCS, raylet, workers and agents then listen on that address or on all interfaces. With
    `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (the switch Ray itself uses on macOS/Windows, ray-project/ray#18730)
    the node address is loopback and every Ray process binds 127.0.0.1. The processes Ray starts take the
    variable from the environment at their start; the driver's constant is set too (`ray` may be imported
    already). Both are restored afterwards, so a later connection to a real cluster is unaffected."""
    import ray._private.ray_constants as ray_constants

    saved_env, saved_const = os.environ.get(RAY_LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[RAY_LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            os.environ.pop(RAY_LOOPBACK_ENV, None)
        else:
            os.environ[RAY_LOOPBACK_ENV] = saved_env


def start_ray(ray, p, project_root: str) -> bool:
    """A local Ray runtime (loopback only), or the configured cluster; True when this call started it."""
    if ray.is_initialized():
        return False
    # workers must import this project; a Ray Job that started us has already arranged that
    inherited = os.environ.get("PYTHONPATH", "")
    env = None if project_root in inherited.split(os.pathsep) else \
        {"env_vars": {"PYTHONPATH": os.pathsep.join(x for x in (project_root, inherited) if x)}}
    if p.ray_address:
        ray.init(address=p.ray_address, runtime_env=env, log_to_driver=False)
    else:
        with loopback_only_ray():  # scheduling slots, not cores: one per encoder worker, two spare
            ray.init(address="local", num_cpus=p.workers + 2, _node_ip_address="127.0.0.1", include_dashboard=False,
                     runtime_env=env, log_to_driver=False)
    return True
