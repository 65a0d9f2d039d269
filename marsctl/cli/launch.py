"""What the training commands (``train sup``, ``train rl``) share: the torchrun launch options,
the re-launch of the command under torchrun, and local-or-Hub artifact specs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import typer

from marsctl.cli.common import console

GPUS_OPTION = typer.Option(1, "--gpus", min=1, help="GPUs on this node: >1 re-launches the command under torchrun with DDP (NCCL).")
PROCS_OPTION = typer.Option(1, "--procs", min=1, help="CPU processes: >1 re-launches under torchrun with DDP over gloo (for testing the distributed path).")
NNODES_OPTION = typer.Option(1, "--nnodes", min=1, help="Nodes in a multi-node run (run the same command on each node).")
NODE_RANK_OPTION = typer.Option(0, "--node-rank", min=0, help="This node's index in a multi-node run.")
MASTER_ADDR_OPTION = typer.Option("127.0.0.1", "--master-addr", help="Address of node 0 in a multi-node run.")
MASTER_PORT_OPTION = typer.Option(29500, "--master-port", help="Port on node 0 in a multi-node run.")
DEVICE_OPTION = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available).")
NUM_WORKERS_OPTION = typer.Option(None, "--num-workers", help="DataLoader worker processes per training process.")


def resolve_spec(spec: str, repo_type: str) -> str:
    """A local path as is; a Hub id through marsctl.hub when that layer is installed."""
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser())
    try:
        from marsctl.hub import resolve_artifact
    except ImportError:
        return spec
    return str(resolve_artifact(spec, repo_type))


@dataclasses.dataclass(frozen=True)
class Launch:
    """The launch options of one training command (``--gpus/--procs/--nnodes/...``)."""

    gpus: int = 1
    procs: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def processes(self) -> int:
        """Processes per node."""
        return max(self.gpus, self.procs)

    @property
    def world_size(self) -> int:
        return self.processes * self.nnodes

    def relaunch_needed(self) -> bool:
        """True when this (non-torchrun) invocation must start the distributed run itself."""
        from marsctl.train.distributed import under_torchrun

        if self.gpus > 1 and self.procs > 1:
            raise typer.BadParameter("give --gpus or --procs, not both")
        return (self.processes > 1 or self.nnodes > 1) and not under_torchrun()

    def child_command(self, command: Sequence[str], options: Sequence[tuple[str, Any]], device: str | None, resume: bool) -> list[str]:
        """The argument list each torchrun process runs: ``command`` plus the options that were given."""
        device = device or ("cuda" if self.gpus > 1 else "cpu" if self.procs > 1 else None)
        child = list(command)
        for flag, value in (*options, ("--device", device)):
            if value is not None:
                child += [flag, str(value)]
        return child + ["--resume" if resume else "--no-resume"]

    def run(self, child: list[str]) -> None:
        """Run ``child`` under torchrun on this node; a failure exits with its status."""
        from marsctl.train.distributed import relaunch

        console.print(f"launching {self.processes} process(es) per node x {self.nnodes} node(s) under torchrun")
        code = relaunch(child, self.processes, nnodes=self.nnodes, node_rank=self.node_rank, master_addr=self.master_addr,
                        master_port=self.master_port)
        if code:
            raise typer.Exit(code)
