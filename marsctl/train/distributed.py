"""Distributed training: torchrun relaunch, process-group setup, rank helpers.

``marsctl train sup --gpus N`` (or ``--procs N`` on CPU) re-executes the *same* command
under ``python -m torch.distributed.run`` with ``N`` processes per node; each process
sees ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and :func:`DistributedContext.from_env` joins
the process group (NCCL on CUDA, gloo on CPU). Multi-node runs pass ``--nnodes``,
``--node-rank``, ``--master-addr`` and ``--master-port`` through to torchrun.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from typing import Sequence

import torch
import torch.distributed as torch_dist

#: set in the relaunched children so that they do not relaunch again
CHILD_ENV = "MARSCTL_DISTRIBUTED_CHILD"


@dataclasses.dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str | None = None) -> "DistributedContext":
        """Read torchrun's environment; join the process group when there is more than one process.

        ``device``: ``cuda``/``cpu``/None (None: CUDA when available). Under torchrun with
        CUDA each process takes GPU ``LOCAL_RANK``.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if kind.startswith("cuda"):
            index = local_rank if world > 1 or kind == "cuda" else torch.device(kind).index or 0
            torch_device = torch.device("cuda", index)
            torch.cuda.set_device(torch_device)
        else:
            torch_device = torch.device(kind)
        initialized = False
        if world > 1 and not torch_dist.is_initialized():
            backend = "nccl" if torch_device.type == "cuda" else "gloo"
            torch_dist.init_process_group(backend=backend)
            initialized = True
        return cls(rank=rank, world_size=world, local_rank=local_rank, device=torch_device, initialized_here=initialized)

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def all_reduce_mean(self, value: float) -> float:
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor)
        return float(tensor.item() / self.world_size)

    def close(self) -> None:
        if self.initialized_here and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ or os.environ.get(CHILD_ENV) == "1"


def torchrun_command(
    command_args: Sequence[str],
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
) -> list[str]:
    """The argument list that runs ``marsctl <command_args>`` under torch.distributed.run."""
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if nnodes > 1:
        args += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={master_addr}", f"--master-port={master_port}"]
    else:
        args += ["--standalone"]
    return args + ["-m", "marsctl", *command_args]


def relaunch(command_args: Sequence[str], nproc_per_node: int, **kwargs) -> int:
    """Run the command under torchrun (argument list, no shell) and return its exit status."""
    env = dict(os.environ, **{CHILD_ENV: "1"})
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(torchrun_command(command_args, nproc_per_node, **kwargs), env=env)


def strip_options(argv: Sequence[str], options_with_value: Sequence[str]) -> list[str]:
    """``argv`` without the launcher options (``--gpus 4`` / ``--gpus=4`` ...), for the children."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in options_with_value:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out
