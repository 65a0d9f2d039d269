"""``marsctl separate``: extract what a query describes from files and folders of audio."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from marsctl.cli.common import console, err_console, user_errors


def separate(
    paths: Optional[List[Path]] = typer.Argument(None, help="Audio/video files or folders (searched recursively)."),
    query: Optional[List[str]] = typer.Option(None, "--query", "-q", help="Text query, e.g. 'dog barking'. Repeat to compose several ('piano' + 'violin')."),
    query_audio: Optional[List[Path]] = typer.Option(None, "--query-audio", help="An example recording of the sound to extract."),
    query_image: Optional[List[Path]] = typer.Option(None, "--query-image", help="An image of what makes the sound."),
    negative: Optional[List[str]] = typer.Option(None, "--negative", help="Text query of what to leave out; pushes the query away from it."),
    negative_strength: float = typer.Option(0.5, "--negative-strength", min=0.0, help="a in (1+a) q - a q_neg."),
    queries_file: Optional[Path] = typer.Option(None, "--queries", help="CSV/JSON mapping file with a query per file (columns path, query[, query_audio, query_image, negative])."),
    out: Path = typer.Option(Path("separated"), "--out", "-o", help="Output folder; mirrors the input tree: OUT/<relative path>/<query>.wav."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Separator: a run directory from 'marsctl train sup/rl' or a Hub id. Default: the small model shipped with marsctl."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Query encoder override (default: the one the model was trained with)."),
    decode: str = typer.Option("mode", "--decode", help="mode (the mask probability P, deterministic), mean (Beta mean), sample (one Beta sample) or best-of-N, e.g. best-of-8 (N samples, keep the one the query encoder scores highest)."),
    residual: bool = typer.Option(False, "--residual", help="Also write <query>.residual.wav = mixture - estimate."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs (default: keep them and skip)."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Chunks processed at once (memory vs speed)."),
    overlap: float = typer.Option(0.25, "--overlap", min=0.0, max=0.9, help="Overlap between chunks of long files."),
    seed: int = typer.Option(0, "--seed", help="Seed for --decode sample."),
) -> None:
    """Separate the sound described by a text, audio or image query from each input file.

    Examples:

      [bold]marsctl separate song.wav --query "violin"[/]

      [bold]marsctl separate ./recordings --query "dog barking" --residual --out separated/[/]

      [bold]marsctl separate --queries per_file.csv --model runs/sup[/]

    Files that cannot be read are listed at the end and the exit status is 1.
    """
    import torch

    from marsctl.separation import InputFile, Query, SeparateOptions, find_inputs, load_model_and_encoder, read_query_mapping, separate_jobs

    with user_errors():
        jobs: list[tuple[InputFile, Query]] = []
        skipped: list[Path] = []
        if queries_file is not None:
            jobs += read_query_mapping(queries_file)
        if paths:
            if not (query or query_audio or query_image):
                raise typer.BadParameter("give --query, --query-audio or --query-image (or a --queries mapping file)")
            the_query = Query(
                texts=tuple(query or ()), audio=tuple(map(str, query_audio or ())), images=tuple(map(str, query_image or ())),
                negative=tuple(negative or ()), negative_strength=negative_strength,
            )
            inputs, skipped = find_inputs(paths)
            jobs += [(item, the_query) for item in inputs]
        elif queries_file is None:
            raise typer.BadParameter("give files or folders to separate (or a --queries mapping file)")
        options = SeparateOptions(out_dir=out, decode=decode, residual=residual, overwrite=overwrite, overlap=overlap, batch_size=batch_size, seed=seed)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        loaded, query_encoder = load_model_and_encoder(model, encoder, device)
        if model is None:
            console.print(f"using the default model shipped with marsctl ({loaded.directory}); pass --model to use yours", highlight=False)

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        files = len({item.path for item, _ in jobs})
        with Progress(TextColumn("[bold]separate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[name]}"), TimeElapsedColumn(), console=err_console) as progress:
            task = progress.add_task("files", total=files, name="")
            report = separate_jobs(loaded, query_encoder, jobs, options, on_file=lambda p: progress.update(task, advance=1, name=p.name))

        console.print(f"wrote {len(report.written)} file(s) under {out}", highlight=False)
        if report.kept_existing:
            console.print(f"kept {len(report.kept_existing)} existing output(s) (use --overwrite to replace them)", highlight=False)
        if skipped:
            console.print(f"skipped {len(skipped)} non-audio file(s) in the folders given", highlight=False)
        if report.failures:
            err_console.print(f"[bold red]{len(report.failures)} file(s) failed:[/]")
            for _, message in report.failures:
                err_console.print(f"  {message}", highlight=False, soft_wrap=True, markup=False)
            raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("separate")(separate)
