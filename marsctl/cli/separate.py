"""``marsctl separate``: extract what a query describes from files and folders of audio.

Thin: parses the options and calls the public API, :class:`marsctl.separate.Separator`.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from marsctl.cli.common import console, err_console, user_errors


def separate(
    paths: Optional[List[Path]] = typer.Argument(None, metavar="PATH", hidden=True),
    query: Optional[List[str]] = typer.Option(None, "--query", "-q", metavar="TEXT", help="Text query, e.g. 'dog barking'. Repeat to compose several."),
    query_audio: Optional[List[Path]] = typer.Option(None, "--query-audio", metavar="FILE", help="An example recording of the sound to extract."),
    query_image: Optional[List[Path]] = typer.Option(None, "--query-image", metavar="FILE", help="An image of what makes the sound."),
    negative: Optional[List[str]] = typer.Option(None, "--negative", metavar="TEXT", help="Text query of what to leave out."),
    negative_strength: float = typer.Option(0.5, "--negative-strength", metavar="A", min=0.0, help="A in (1+A) q - A q_neg."),
    queries_file: Optional[Path] = typer.Option(None, "--queries", metavar="FILE", help="CSV/JSON file with a query per file (columns path, query; optional query_audio, query_image, negative)."),
    out: Path = typer.Option(Path("separated"), "--out", "-o", metavar="DIR", help="Output folder: DIR/<relative path>/<query>.wav."),
    model: Optional[str] = typer.Option(None, "--model", "-m", metavar="MODEL", help="A run folder, a Hub id org/name\\[@rev] or 'default' (the small model shipped with marsctl)."),
    encoder: Optional[str] = typer.Option(None, "--encoder", metavar="SPEC", help="Query encoder override (default: the model's own)."),
    decode: str = typer.Option("mode", "--decode", metavar="MODE", help="mode (P, deterministic), mean (Beta mean), sample (one draw) or best-of-N, e.g. best-of-8 (the draw the query encoder scores highest)."),
    residual: bool = typer.Option(False, "--residual", metavar="", help="Also write <query>.residual.wav = mixture - estimate."),
    overwrite: bool = typer.Option(False, "--overwrite", metavar="", help="Replace existing outputs (default: keep them)."),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE", help="cpu, cuda or cuda:N (default: cuda when available)."),
    batch_size: int = typer.Option(8, "--batch-size", metavar="N", min=1, help="Chunks processed at once."),
    overlap: float = typer.Option(0.25, "--overlap", metavar="F", min=0.0, max=0.9, help="Overlap between chunks."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed for --decode sample and best-of-N."),
) -> None:
    """Separate the sound a text, audio or image query describes from each PATH
    (audio/video files, or folders searched recursively; the output folder is left out).

    Examples:

      [bold]marsctl separate song.wav --query "violin"[/]

      [bold]marsctl separate ./recordings -q "dog barking" --residual[/]

      [bold]marsctl separate --queries per_file.csv --model runs/sup[/]

    Files that cannot be read are listed at the end and the exit status is 1.
    """
    from marsctl.separate import InputFile, Query, Separator, check_output_folder, find_inputs, read_query_mapping

    with user_errors():
        jobs: list[tuple[InputFile, Query]] = []
        problems: list[str] = []
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
            search = find_inputs(paths, exclude=[out])
            jobs += [(item, the_query) for item in search.files]
            problems, skipped = search.problems, search.skipped_non_audio
        elif queries_file is None:
            raise typer.BadParameter("give files or folders to separate (or a --queries mapping file)")
        check_output_folder(out)  # before the model is loaded: fail fast
        separator = Separator.from_pretrained(model or "default", encoder=encoder, device=device, decode=decode,
                                              overlap=overlap, batch_size=batch_size, seed=seed)
        if model is None:
            console.print(f"using the default model shipped with marsctl ({separator.directory}); pass --model to use yours", highlight=False)
        for note in separator.out_of_vocabulary([text for _, q in jobs for text in q.texts]):
            err_console.print(f"[yellow]note:[/] {note.message()}", highlight=False, soft_wrap=True)
        separator.prepare([q for _, q in jobs], release_text_model=True)  # every query is known: free the text model
        report = _run_with_progress(separator, jobs, out, residual, overwrite)

    console.print(f"wrote {len(report.written)} file(s) under {out}", highlight=False)
    if report.kept_existing:
        console.print(f"kept {len(report.kept_existing)} existing output(s) (use --overwrite to replace them)", highlight=False)
    if skipped:
        console.print(f"skipped {len(skipped)} non-audio file(s) in the folders given", highlight=False)
    messages = problems + [message for _, message in report.failures]
    if messages:
        err_console.print(f"[bold red]{len(messages)} file(s) failed:[/]")
        for message in messages:
            err_console.print(f"  {message}", highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(1)


def _run_with_progress(separator, jobs, out: Path, residual: bool, overwrite: bool):
    """Separate with two displays: files done, and seconds done within the current file."""
    from marsctl.progress import FileProgress

    with FileProgress(len({item.path for item, _ in jobs}), err_console) as progress:
        return separator.separate_files(
            jobs, out, residual=residual, overwrite=overwrite,
            on_file=lambda path: progress.file_done(path.name),
            on_progress=lambda path, done, total: progress.within(path.name, done, total),
        )


def register(app: typer.Typer) -> None:
    app.command("separate")(separate)
