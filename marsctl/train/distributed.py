"""Distributed training: torchrun relaunch, process-group setup, rank helpers.

``marsctl train sup --gpus N`` (or ``--procs N`` on CPU) re-executes the *same* command
under ``python -m torch.distributed.run`` with ``N`` processes per node; each process
sees ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and :func:`DistributedContext.from_env` joins
the process group (NCCL on CUDA, gloo on CPU). Multi-node runs pass ``--nnodes``,
``--node-rank``, ``--master-addr`` and ``--master-port`` through to torchrun.

Only rank 0 validates and writes checkpoints while the other ranks wait in their next collective,
so the process group's timeout (:data:`COLLECTIVE_TIMEOUT`, ``MARSCTL_COLLECTIVE_TIMEOUT_S``) is
sized to a validation, not to NCCL's 10-minute default. The launcher forwards SIGINT/SIGTERM to
torchrun, which ends its workers (they run in their own session: killing the launcher's process
group does not reach them).
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
import signal
import subprocess
import sys
import time
from typing import Sequence

import torch
import torch.distributed as torch_dist

from marsctl.errors import MarsctlError

#: set in the relaunched children so that they do not relaunch again
CHILD_ENV = "MARSCTL_DISTRIBUTED_CHILD"
#: seconds a collective waits for the slowest rank (rank 0 validating or checkpointing); overridden
#: by this environment variable
TIMEOUT_ENV = "MARSCTL_COLLECTIVE_TIMEOUT_S"
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)
#: seconds the launcher waits for torchrun to end its workers after forwarding a signal
SIGNAL_GRACE_SECONDS = 60.0


def collective_timeout() -> datetime.timedelta:
    """:data:`COLLECTIVE_TIMEOUT`, or ``MARSCTL_COLLECTIVE_TIMEOUT_S`` seconds when set."""
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return COLLECTIVE_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise MarsctlError(f"{TIMEOUT_ENV}={value!r}: expected a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


def check_cuda(device: str | None, processes: int = 1) -> None:
    """One line when ``device`` (``cuda`` / ``cuda:N``) or ``processes`` GPUs per node are asked for and
    this machine does not have them (checked before relaunching or joining a process group)."""
    if not device or not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        asked = f"--gpus {processes}" if processes > 1 else f"--device {device}"
        raise MarsctlError(f"{asked}: no CUDA GPU is visible here (torch.cuda.is_available() is False); use --device cpu")
    visible = torch.cuda.device_count()
    wanted = max(processes, (torch.device(device).index or 0) + 1)
    if wanted > visible:
        asked = f"--gpus {processes}" if processes > 1 else f"--device {device}"
        raise MarsctlError(f"{asked}: only {visible} CUDA GPU(s) visible here")


def bf16_autocast(requested: bool, device: torch.device) -> bool:
    """Whether to train under bf16 autocast: asked for, on a CUDA device whose hardware has bf16
    (``is_bf16_supported`` without emulation: an emulated bf16 is slower than fp32)."""
    if not requested or device.type != "cuda":
        return False
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


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
            check_cuda(f"cuda:{index}")  # one line instead of set_device's traceback
            torch_device = torch.device("cuda", index)
            torch.cuda.set_device(torch_device)
        else:
            torch_device = torch.device(kind)
        initialized = False
        if world > 1 and not torch_dist.is_initialized():
            backend = "nccl" if torch_device.type == "cuda" else "gloo"
            torch_dist.init_process_group(backend=backend, timeout=collective_timeout())
            # kept until the process ends: a later stage in the same process (train sup, then train rl)
            # reuses it; destroying and re-creating the default group under one torchrun rendezvous hung
            # (one rank in init_process_group, the other already in its first collective)
            atexit.register(_destroy_process_group)
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

    def mean_metrics(self, reduced: dict[str, torch.Tensor | float], local: dict[str, torch.Tensor | float] | None = None) -> dict[str, float]:
        """Logged metrics as floats: ``reduced`` averaged over the ranks with ONE all-reduce of their
        stacked values, ``local`` as this rank has them; one copy to the host for all of them."""
        local = local or {}

        def stacked(values) -> torch.Tensor:
            parts = [torch.as_tensor(v, dtype=torch.float64, device=self.device).detach().reshape(1) for v in values]
            return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=self.device)

        shared = stacked(reduced.values())
        if self.enabled and shared.numel():
            torch_dist.all_reduce(shared)
            shared = shared / self.world_size
        values = torch.cat([shared, stacked(local.values())]).tolist()
        return dict(zip([*reduced, *local], values))

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch_dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def all_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on every rank."""
        if not self.enabled:
            return flag
        tensor = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self.device)
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MIN)
        return bool(tensor.item())

    def close(self) -> None:
        """End of one stage. The process group stays for the next stage of this process (it is destroyed at
        exit): no collective here, so a rank leaving on an error does not hang the others in it."""


def _destroy_process_group() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def process_rank() -> int:
    """This process's global rank under torchrun (0 outside it)."""
    return int(os.environ.get("RANK", "0"))


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
    return run_forwarding_signals(torchrun_command(command_args, nproc_per_node, **kwargs), env)


def run_forwarding_signals(args: Sequence[str], env: dict[str, str] | None = None,
                           grace_seconds: float = SIGNAL_GRACE_SECONDS) -> int:
    """Run ``args`` and return its exit status; a SIGINT or SIGTERM received meanwhile is passed on
    to it (torchrun then ends its workers, which live in their own session), and it is killed if it
    is still running ``grace_seconds`` later."""
    process = subprocess.Popen(list(args), env=env)
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        if process.poll() is None:
            process.send_signal(signum)

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, forward) for signum in handled}
    try:
        deadline = None
        while True:
            try:
                return process.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
            if received and deadline is None:
                deadline = time.monotonic() + grace_seconds
            if deadline is not None and time.monotonic() > deadline:
                process.kill()
                return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
