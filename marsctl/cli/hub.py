"""``marsctl hub push|pull``: artifacts on the Hugging Face Hub.

Also defines the ``--push-to`` / ``--reuse`` options that the long stages share, so their
help text reads the same everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from marsctl.cli.common import console, err_console, user_errors

hub_app = typer.Typer(
    help=(
        "Share artifacts on the Hugging Face Hub: push a dataset build, reward encoder, separator, "
        "RL policy or eval report with a generated card; pull one into the Hugging Face cache.\n\n"
        "Any --data/--model/--encoder option also takes a Hub id, org/name[@revision], and resolves "
        "it through the same cache (with HF_HUB_OFFLINE=1, from the cache only). The token comes from "
        "HF_TOKEN or `hf auth login`; the Hub address from HF_ENDPOINT."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)

#: ``--push-to`` for every long stage (use as ``push_to: Optional[str] = PUSH_TO_OPTION``).
PUSH_TO_OPTION = typer.Option(
    None,
    "--push-to",
    metavar="ORG/NAME",
    help="Push the finished output to this Hub repo, with a card (needs a token).",
)
#: ``--reuse`` for every long stage (use as ``reuse: bool = REUSE_OPTION``).
REUSE_OPTION = typer.Option(
    False,
    "--reuse",
    metavar="",
    help="Use an artifact made from the same config and inputs (in --out, the Hugging Face cache or at "
    "--push-to) instead of recomputing.",
)


@hub_app.command("push")
def push(
    path: Path = typer.Argument(..., metavar="PATH", help="Artifact folder: dataset, encoder, run or eval report."),
    repo_id: str = typer.Argument(..., metavar="ORG/NAME", help="Hub repo to push to (created if missing)."),
    kind: Optional[str] = typer.Option(
        None, "--kind", metavar="KIND",
        help="dataset, reward-encoder, separator, rl-policy or eval-report, when the folder does not say.",
    ),
    include_checkpoints: bool = typer.Option(
        False, "--include-checkpoints", metavar="", help="Also send checkpoints/ (for resuming training).",
    ),
    private: Optional[bool] = typer.Option(
        None, "--private/--public", metavar="", help="Visibility of a new repo (default: the Hub's)."
    ),
    message: Optional[str] = typer.Option(None, "--message", metavar="TEXT", help="Commit message."),
    dry_run: bool = typer.Option(False, "--dry-run", metavar="", help="List the files and the card; send nothing."),
    show_card: bool = typer.Option(False, "--show-card", metavar="", help="With --dry-run, print the whole card."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the result as JSON."),
) -> None:
    """Push an artifact folder to a Hub repo of the right type, with a generated card (README.md).

    Example: [bold]marsctl hub push runs/align/encoder my-org/mars-reward-encoder[/]

    The kind (dataset: dataset repo; reward encoder, separator, RL policy: model repo; eval report: dataset repo) is read from dataset.json or artifact.json, which every stage writes; an older artifact's kind is guessed from its files, with a note. The card records the config, the recipe, the metrics, how the artifact was made and its content hash; it is also written into the folder.

    Caches, temporary files (.*.tmp*), locks, __pycache__, token files and checkpoints/ are not sent. A file containing the token or a token-shaped string, or a symlink leading outside the folder, stops the push.

    Large folders go up in several commits; if an upload is interrupted, run the same command again: what is already on the Hub is skipped.
    """
    from marsctl.hub import plan_push, push_artifact

    with user_errors():
        if dry_run:
            plan = plan_push(path, repo_id, kind=kind, include_checkpoints=include_checkpoints)
            if as_json:
                print(json.dumps({"repo_id": plan.repo_id, "repo_type": plan.repo_type, "kind": plan.info.kind,
                                  "files": plan.files, "content_sha256": plan.content_fingerprint}, indent=2))
                return
            if plan.info.kind_note:
                err_console.print(f"note: {plan.info.kind_note}", highlight=False, soft_wrap=True)
            console.print(f"[bold]{plan.info.kind}[/] {plan.info.path} -> {plan.repo_type} repo [bold]{plan.repo_id}[/]")
            console.print(f"{len(plan.files)} files would be sent (README.md is the generated card):")
            for name in plan.files[:50]:
                console.print(f"  {name}", highlight=False)
            if len(plan.files) > 50:
                console.print(f"  ... and {len(plan.files) - 50} more")
            console.print(f"content hash {plan.content_fingerprint}")
            if show_card:
                console.print(plan.card, markup=False, highlight=False)
            return
        result = push_artifact(path, repo_id, kind=kind, include_checkpoints=include_checkpoints, private=private,
                               commit_message=message)
        if result.kind_note:
            err_console.print(f"note: {result.kind_note}", highlight=False, soft_wrap=True)
        if as_json:
            print(json.dumps({"repo_id": result.repo_id, "repo_type": result.repo_type, "kind": result.kind,
                              "commit": result.commit, "url": result.commit_url, "spec": result.spec,
                              "files": result.files, "content_sha256": result.content_fingerprint}, indent=2))
            return
        console.print(f"pushed {result.kind} ({len(result.files)} files) to {result.repo_type} repo "
                      f"[bold]{result.repo_id}[/] at commit {result.commit}")
        console.print(f"use it as: {result.spec}", highlight=False)


@hub_app.command("pull")
def pull(
    spec: str = typer.Argument(
        ..., metavar="ORG/NAME[@REV]", help="Hub artifact; a datasets/ or models/ prefix sets the repo type."
    ),
    repo_type: Optional[str] = typer.Option(
        None, "--repo-type", metavar="TYPE", help="model or dataset (default: try model, then dataset)."
    ),
) -> None:
    """Download a Hub artifact into the Hugging Face cache and print its local folder.

    Example: [bold]marsctl hub pull datasets/my-org/vggsound-clean@v1[/]

    Afterwards the same id works with no network (HF_HUB_OFFLINE=1) in every --data, --model and --encoder option. With HF_HUB_OFFLINE=1, pull only looks in the cache. An interrupted download resumes when run again.
    """
    from marsctl.hub import pull_artifact

    with user_errors():
        folder = pull_artifact(spec, repo_type)
        err_console.print(f"{spec} is in the Hugging Face cache:", highlight=False)
        print(folder)


def register(app: typer.Typer) -> None:
    app.add_typer(hub_app, name="hub")
