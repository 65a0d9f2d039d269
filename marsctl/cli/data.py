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
        "Recipes live in recipes/data/ (soundfont, folder, vggsound-clean, music-clean) or are given "
        "as a YAML path. 'marsctl data build RECIPE' runs every stage and can be rerun after a kill: "
        "finished work is skipped. The output layout and manifest schema are described in "
        "marsctl/data/manifest.py."
    ),
    no_args_is_help=True,
)

_OUT = typer.Option(None, "--out", "-o", help="Dataset directory to write (default: data/<recipe name>).")
_SOURCE_LIST = typer.Option(
    None, "--source-list", help="Local source list (VGGSound CSV or MUSIC JSON) instead of the recipe's URL."
)
_ROOT = typer.Option(None, "--root", help="Folder recipe: the labeled folder tree (<root>/<label>/...).")
_WORKERS = typer.Option(None, "--workers", "-j", min=1, help="Parallel downloads (default: the recipe's).")
_MIRROR = typer.Option(
    None, "--mirror", help="Hugging Face dataset repo (org/name) with copies of videos gone from YouTube."
)
_COOKIES = typer.Option(
    None, "--cookies", help="Cookies file (Netscape format) for yt-dlp, when YouTube asks to sign in."
)
_LIMIT = typer.Option(
    None, "--limit", min=0,
    help="Only the first N work units of the source (videos, files; classes for soundfont): a quick look.",
)
_RETRY = typer.Option(False, "--retry-failed", help="Try again the items that failed in an earlier run.")
_QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")


def _options(source_list, root, workers, mirror, cookies, limit, retry_failed, quiet):
    from marsctl.data.fetch import FetchOptions

    return FetchOptions(
        source_list=source_list, root=root, workers=workers, mirror=mirror, cookies=cookies, limit=limit,
        retry_failed=retry_failed, progress=not quiet,
    )


def _out_dir(out: Optional[Path], recipe) -> Path:
    return out if out is not None else Path("data") / recipe.name


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
    recipe: str = typer.Argument(..., help="Recipe name (e.g. soundfont, vggsound-clean) or path to a recipe YAML."),
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
        from marsctl.data.build import build
        from marsctl.data.recipe import load_recipe
        from marsctl.hub import run_stage

        spec = load_recipe(recipe)
        dataset_dir = _out_dir(out, spec)
        summary = None

        def _build() -> None:
            nonlocal summary
            summary = build(spec, dataset_dir, _options(source_list, root, workers, mirror, cookies, limit, retry_failed, quiet))

        # identity for --reuse / the card: the recipe, --limit, and the local inputs (source list file, labeled folder)
        inputs = {"source_list": source_list if source_list and Path(source_list).is_file() else None, "root": root}
        outcome = run_stage("data.build", {"recipe": spec.to_mapping(), "limit": limit}, inputs, dataset_dir, _build,
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
    recipe: str = typer.Argument(..., help="Recipe name or path to a recipe YAML."),
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
        from marsctl.data.build import BuildSummary, summarize_fetch, sweep_temporary_files, write_card
        from marsctl.data.fetch import apply_options, fetch
        from marsctl.data.recipe import load_recipe

        options = _options(source_list, root, workers, mirror, cookies, limit, retry_failed, quiet)
        spec = load_recipe(recipe)
        dataset_dir = _out_dir(out, spec)
        spec = apply_options(spec, options, dataset_dir)
        dataset_dir.mkdir(parents=True, exist_ok=True)
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
    dataset: Path = typer.Argument(..., help="A fetched dataset directory."),
    recipe: Optional[str] = typer.Option(
        None, "--recipe", help="Recipe with the thresholds to apply (default: the one in dataset.json)."
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
    dataset: Path = typer.Argument(..., help="A filtered dataset directory."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe with the mix settings (default: dataset.json's)."),
    quiet: bool = _QUIET,
) -> None:
    """Write the fixed, seeded mixtures (mixtures/<split>/...) and manifests/mixtures.parquet."""
    with user_errors():
        from marsctl.data.build import read_card_recipe, remix
        from marsctl.data.recipe import load_recipe

        spec = load_recipe(recipe) if recipe else read_card_recipe(dataset)
        summary = remix(spec, dataset, progress=not quiet)
        print_summary(summary, dataset)


@data_app.command("recipes")
def recipes_cmd() -> None:
    """List the recipes shipped in recipes/data/."""
    with user_errors():
        from marsctl.data.recipe import available_recipes, load_recipe

        table = Table()
        table.add_column("recipe")
        table.add_column("source")
        table.add_column("description")
        for name in available_recipes():
            spec = load_recipe(name)
            table.add_row(name, spec.source_kind, spec.description.strip())
        console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
