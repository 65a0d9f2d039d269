"""``marsctl data``: build datasets from recipes (fetch -> filter -> mix), or run one stage."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from marsctl.cli.common import console, err_console, user_errors
from marsctl.cli.hub import PUSH_TO_OPTION, REUSE_OPTION

data_app = typer.Typer(
    help=(
        "Build datasets from recipes: fetch clips, filter them (clean+), write fixed mixtures.\n\n"
        "A recipe is a shipped name ('marsctl data recipes' lists them) or a YAML file. "
        "'marsctl data build RECIPE' runs every stage and can be rerun after a kill: "
        "finished work is skipped. The output layout and manifest schema are described in "
        "marsctl/data/manifest.py."
    ),
    no_args_is_help=True,
)

_OUT = typer.Option(None, "--out", "-o", metavar="DIR", help="Dataset folder to write (default: data/<recipe name>).")
_SOURCE_LIST = typer.Option(
    None, "--source-list", metavar="FILE", help="Local source list (VGGSound CSV, MUSIC JSON) instead of the recipe's URL."
)
_ROOT = typer.Option(None, "--root", metavar="DIR", help="Folder recipes: the labeled tree, DIR/<label>/... Union recipes: the folder relative member paths start from.")
_WORKERS = typer.Option(None, "--workers", "-j", metavar="N", min=1, help="Parallel downloads (default: the recipe's).")
_MIRROR = typer.Option(
    None, "--mirror", metavar="ORG/NAME", help="Hub dataset repo with copies of videos gone from YouTube."
)
_COOKIES = typer.Option(None, "--cookies", metavar="FILE", help="Cookies file (Netscape format) for yt-dlp.")
_LIMIT = typer.Option(
    None, "--limit", metavar="N", min=0, help="Only the first N work units (videos, files, classes): a quick look.",
)
_RETRY = typer.Option(False, "--retry-failed", metavar="", help="Try again the items that failed before.")
_QUIET = typer.Option(False, "--quiet", "-q", metavar="", help="No progress display.")
_RECIPE_ARG = typer.Argument(..., metavar="RECIPE", help="A recipe name (see 'marsctl data recipes') or a YAML file.")
_DATASET_ARG = typer.Argument(..., metavar="DIR", help="A dataset folder.")


def _options(source_list, root, workers, mirror, cookies, limit, retry_failed, quiet):
    from marsctl.data.fetch import FetchOptions

    return FetchOptions(
        source_list=source_list, root=root, workers=workers, mirror=mirror, cookies=cookies, limit=limit,
        retry_failed=retry_failed, progress=not quiet,
    )


def _out_dir(out: Optional[Path], recipe) -> Path:
    """``--out``, else ``data/<name>`` (the recipe's name is a plain name: it stays inside data/)."""
    if out is not None:
        return out
    from marsctl.data.recipe import check_recipe_name

    check_recipe_name(recipe.name, "recipe")  # also checked when the recipe is read
    return Path("data") / recipe.name


def print_summary(summary, dataset_dir: Path) -> None:
    table = Table(title=f"{summary.recipe}: {dataset_dir}", show_lines=False)
    table.add_column("what")
    table.add_column("detail")
    table.add_column("count", justify="right")
    table.add_row("[green]kept", "all splits", str(summary.kept))
    for split, n in sorted(summary.kept_per_split.items()):
        table.add_row("", split, str(n))
    for reason, n in sorted(summary.dropped.items()):
        table.add_row("[yellow]dropped", reason, str(n))
    for reason, n in sorted(summary.failed.items()):
        table.add_row("[red]failed", reason, str(n))
    for reason, n in sorted(summary.skipped.items()):
        table.add_row("[red]skipped", reason, str(n))
    for split, n in sorted(summary.mixtures_per_split.items()):
        table.add_row("[cyan]mixtures", split, str(n))
    console.print(table)
    if summary.n_failed:
        err_console.print(
            f"[yellow]{summary.n_failed} item(s) failed or were skipped; reasons in {dataset_dir / 'logs/failures.jsonl'}"
        )


@data_app.command("build")
def build_cmd(
    recipe: str = _RECIPE_ARG,
    out: Optional[Path] = _OUT,
    source_list: Optional[str] = _SOURCE_LIST,
    root: Optional[str] = _ROOT,
    workers: Optional[int] = _WORKERS,
    mirror: Optional[str] = _MIRROR,
    cookies: Optional[str] = _COOKIES,
    limit: Optional[int] = _LIMIT,
    retry_failed: bool = _RETRY,
    quiet: bool = _QUIET,
    push_to: Optional[str] = PUSH_TO_OPTION,
    reuse: bool = REUSE_OPTION,
) -> None:
    """Build a dataset: fetch -> filter -> mix. Rerun the same command to resume after an interruption.

    Exits 1 when some items failed or were skipped (the rest is built; see logs/failures.jsonl).
    """
    with user_errors():
        from marsctl.data.build import build, folder_files_input
        from marsctl.data.recipe import load_recipe
        from marsctl.hub import run_stage

        spec = load_recipe(recipe)
        dataset_dir = _out_dir(out, spec)
        summary = None

        def _build() -> None:
            nonlocal summary
            summary = build(spec, dataset_dir, options)

        # identity for --reuse / the card: the recipe, --limit, and the local inputs (source list file, and the
        # files of a folder recipe's labeled folder that the build reads; for other kinds --root only says
        # where relative paths start)
        options = _options(source_list, root, workers, mirror, cookies, limit, retry_failed, quiet)
        folder_root = folder_files_input(spec, dataset_dir, options) if spec.source_kind == "folder" else None
        inputs = {"source_list": source_list if source_list and Path(source_list).is_file() else None, "root": folder_root}
        identity = {"recipe": spec.to_mapping(), "limit": limit, **({"root": str(Path(root).resolve())} if root and not folder_root else {})}
        outcome = run_stage("data.build", identity, inputs, dataset_dir, _build,
                            kind="dataset", reuse=reuse, push_to=push_to)
        if outcome.reused:
            console.print(f"reused the dataset built with the same recipe and inputs: {outcome.path}", highlight=False)
        else:
            print_summary(summary, dataset_dir)
        if outcome.pushed is not None:
            console.print(f"pushed to the Hub: {outcome.pushed.spec}", highlight=False)
    if summary is not None and summary.n_failed:
        raise typer.Exit(1)


@data_app.command("fetch")
def fetch_cmd(
    recipe: str = _RECIPE_ARG,
    out: Optional[Path] = _OUT,
    source_list: Optional[str] = _SOURCE_LIST,
    root: Optional[str] = _ROOT,
    workers: Optional[int] = _WORKERS,
    mirror: Optional[str] = _MIRROR,
    cookies: Optional[str] = _COOKIES,
    limit: Optional[int] = _LIMIT,
    retry_failed: bool = _RETRY,
    quiet: bool = _QUIET,
) -> None:
    """Fetch (download, render or import) the clips of a recipe only; resumable."""
    with user_errors():
        from marsctl.data.build import BuildSummary, build_lock, summarize_fetch, sweep_temporary_files, write_card
        from marsctl.data.fetch import apply_options, fetch
        from marsctl.data.recipe import load_recipe

        options = _options(source_list, root, workers, mirror, cookies, limit, retry_failed, quiet)
        spec = load_recipe(recipe)
        dataset_dir = _out_dir(out, spec)
        spec = apply_options(spec, options, dataset_dir)
        dataset_dir.mkdir(parents=True, exist_ok=True)
        with build_lock(dataset_dir):
            sweep_temporary_files(dataset_dir)
            write_card(dataset_dir, spec, "fetching")
            result = fetch(spec, dataset_dir, options)
            summary = BuildSummary(recipe=spec.name)
            summarize_fetch(summary, result)
            write_card(dataset_dir, spec, "fetched", summary)
        console.print(f"fetched {len(result.ok)} clip(s) into {dataset_dir} ({result.units_reused} unit(s) already done)")
        print_summary(summary, dataset_dir)
    if summary.n_failed:
        raise typer.Exit(1)


@data_app.command("filter")
def filter_cmd(
    dataset: Path = _DATASET_ARG,
    recipe: Optional[str] = typer.Option(
        None, "--recipe", metavar="RECIPE", help="Recipe with the thresholds to apply (default: dataset.json's)."
    ),
    quiet: bool = _QUIET,
) -> None:
    """(Re)run the clean+ filter: score clips (cached) and write manifests/clips.parquet with keep/drop reasons."""
    with user_errors():
        from marsctl.data.build import read_card_recipe, refilter
        from marsctl.data.recipe import load_recipe

        spec = load_recipe(recipe) if recipe else read_card_recipe(dataset)
        summary = refilter(spec, dataset, progress=not quiet)
        print_summary(summary, dataset)


@data_app.command("mix")
def mix_cmd(
    dataset: Path = _DATASET_ARG,
    recipe: Optional[str] = typer.Option(
        None, "--recipe", metavar="RECIPE", help="Recipe with the mix settings (default: dataset.json's)."
    ),
    quiet: bool = _QUIET,
) -> None:
    """Write the fixed, seeded mixtures (mixtures/<split>/...) and manifests/mixtures.parquet."""
    with user_errors():
        from marsctl.data.build import read_card_recipe, remix
        from marsctl.data.recipe import load_recipe

        spec = load_recipe(recipe) if recipe else read_card_recipe(dataset)
        summary = remix(spec, dataset, progress=not quiet)
        print_summary(summary, dataset)


@data_app.command("audit")
def audit_cmd(
    dataset: Path = _DATASET_ARG,
    encoder: str = typer.Option(
        "default", "--encoder", metavar="SPEC", help="Encoder for the label check ('default', 'aisfx', a folder; 'none' skips it)."
    ),
    near_threshold: float = typer.Option(0.98, "--near-threshold", metavar="COS", help="Near-duplicate cosine (log-mel statistics)."),
    knn: int = typer.Option(5, "--knn", metavar="K", min=1, help="Neighbours of other groups for the kNN label check."),
    quiet: bool = _QUIET,
) -> None:
    """Audit the labels: duplicates, encoder and kNN disagreement, spectral checks; writes DIR/audit/ (drops nothing)."""
    with user_errors():
        from marsctl.data.audit import SUMMARY_MD, AuditConfig, audit_dataset

        config = AuditConfig(encoder=None if encoder == "none" else encoder, near_threshold=near_threshold, knn_k=knn)
        summary = audit_dataset(dataset, config, progress=not quiet)
        flags = ", ".join(f"{k} {v}" for k, v in summary.flags.items()) or "none"
        console.print(f"audit: {summary.clips} clips, {summary.flagged_clips} flagged ({flags})", highlight=False)
        console.print(f"report: {dataset / SUMMARY_MD}", highlight=False)


@data_app.command("recipes")
def recipes_cmd() -> None:
    """List the shipped recipes (and those in ./recipes/data); a broken one is named and skipped."""
    from marsctl.data.recipe import available_recipes, load_recipe
    from marsctl.errors import MarsctlError

    table = Table(expand=False)
    table.add_column("recipe", no_wrap=True)
    table.add_column("source", no_wrap=True)
    table.add_column("description")
    broken = 0
    for name in available_recipes():
        try:
            spec = load_recipe(name)
        except MarsctlError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            broken += 1
            continue
        table.add_row(name, spec.source_kind, " ".join(spec.description.split()))
    console.print(table)
    if broken:
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
