"""What the training commands (``train sup``, ``train rl``) share: the torchrun launch options, the Hub stage,
the re-launch of the command under torchrun, and local-or-Hub artifact specs."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import typer

from marsctl.cli.common import console

GPUS_OPTION = typer.Option(1, "--gpus", min=1, metavar="N", help="GPUs on this node: >1 re-launches the command under torchrun with DDP (NCCL).")
PROCS_OPTION = typer.Option(1, "--procs", min=1, metavar="N", help="CPU processes: >1 re-launches under torchrun with DDP over gloo (for testing the distributed path).")
NNODES_OPTION = typer.Option(1, "--nnodes", min=1, metavar="N", help="Nodes in a multi-node run (run the same command on each node).")
NODE_RANK_OPTION = typer.Option(0, "--node-rank", min=0, metavar="N", help="This node's index in a multi-node run.")
MASTER_ADDR_OPTION = typer.Option("127.0.0.1", "--master-addr", metavar="HOST", help="Address of node 0 in a multi-node run.")
MASTER_PORT_OPTION = typer.Option(29500, "--master-port", metavar="PORT", help="Port on node 0 in a multi-node run.")
DEVICE_OPTION = typer.Option(None, "--device", metavar="DEVICE", help="cuda or cpu (default: cuda when available).")
NUM_WORKERS_OPTION = typer.Option(None, "--num-workers", metavar="N", help="DataLoader worker processes per training process.")


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


def training_stage(config: Any, identity, out: Path, run, *, stage: str, kind: str, reused_what: str, push_to: str | None, reuse: bool,
                   world_size: int) -> None:
    """``--reuse`` / ``--push-to`` around a training run, keyed by ``identity(config)`` (the settings
    that change the result, and the input artifacts to fingerprint) and the world size (batch_size is
    per process)."""
    from marsctl.hub import run_stage
    from marsctl.train.safety import check_run_folder

    check_run_folder(out)  # before the stage wrapper touches out's provenance.json: a user's folder is refused
    settings, inputs = identity(config)
    outcome = run_stage(stage, {**settings, "world_size": world_size}, inputs, out, run, kind=kind, reuse=reuse, push_to=push_to)
    if outcome.reused:
        console.print(f"reused {reused_what}: {outcome.path}", highlight=False)
    if outcome.pushed is not None:
        console.print(f"pushed to the Hub: {outcome.pushed.spec}", highlight=False)


#: the options every training command takes after its own, passed to it as ``**launch_options``
_LAUNCH_OPTIONS = {
    "num_workers": (Optional[int], NUM_WORKERS_OPTION),
    "device": (Optional[str], DEVICE_OPTION),
    "resume": (bool, typer.Option(True, "--resume/--no-resume", metavar="", help="Continue from the last checkpoint in --out (default), or start over (deletes the old checkpoints).")),
    "gpus": (int, GPUS_OPTION),
    "procs": (int, PROCS_OPTION),
    "nnodes": (int, NNODES_OPTION),
    "node_rank": (int, NODE_RANK_OPTION),
    "master_addr": (str, MASTER_ADDR_OPTION),
    "master_port": (int, MASTER_PORT_OPTION),
}


def with_launch_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give a Typer command the launch options (``--num-workers --device --resume --gpus --procs --nnodes
    --node-rank --master-addr --master-port``) and ``--push-to``/``--reuse``; ``command`` takes them as
    ``**launch_options``."""
    from marsctl.cli.hub import PUSH_TO_OPTION, REUSE_OPTION

    options = {**_LAUNCH_OPTIONS, "push_to": (Optional[str], PUSH_TO_OPTION), "reuse": (bool, REUSE_OPTION)}
    own = [p for p in inspect.signature(command).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hint) for name, (hint, default) in options.items()]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        command(**kwargs)

    wrapper.__signature__ = inspect.Signature([*own, *added])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**typing.get_type_hints(command), **{name: hint for name, (hint, _) in options.items()}}
    return wrapper
