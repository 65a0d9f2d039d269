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
    span: Optional[List[str]] = typer.Option(None, "--span", metavar="A:B", help="A time span of each input, from A to B seconds (e.g. 6.3:7.0), whose sound is the query (embedded like --query-audio). Repeat for several."),
    negative: Optional[List[str]] = typer.Option(None, "--negative", metavar="TEXT", help="Text query of what to leave out."),
    negative_strength: float = typer.Option(0.5, "--negative-strength", metavar="A", min=0.0, help="A in (1+A) q - A q_neg."),
    queries_file: Optional[Path] = typer.Option(None, "--queries", metavar="FILE", help="CSV/JSON file with a query per file (columns path, query; optional query_audio, query_image, span, negative)."),
    out: Path = typer.Option(Path("separated"), "--out", "-o", metavar="DIR", help="Output folder: DIR/<relative path>/<query>.wav."),
    sample_rate: Optional[int] = typer.Option(None, "--sample-rate", metavar="HZ", help="Rate of the files written (default: each input's own rate; the model runs at its own and its estimate is resampled back)."),
    output_format: str = typer.Option("wav", "--format", metavar="FORMAT", help="wav or flac. Outputs are mono: channels are averaged."),
    subtype: Optional[str] = typer.Option(None, "--subtype", metavar="SUBTYPE", help="Sample format: FLOAT (wav default), PCM_16, PCM_24 (flac default), PCM_32 or DOUBLE; integer formats clip at full scale."),
    model: Optional[str] = typer.Option(None, "--model", "-m", metavar="MODEL", help="A run folder, a Hub id org/name\\[@rev] or 'default' (the small model shipped with marsctl)."),
    encoder: Optional[str] = typer.Option(None, "--encoder", metavar="SPEC", help="Query encoder override (default: the model's own)."),
    decode: str = typer.Option("mode", "--decode", metavar="MODE", help="mode (P, deterministic), mean (Beta mean), sample (one draw) or best-of-N, e.g. best-of-8 (the draw the query encoder scores highest)."),
    residual: bool = typer.Option(False, "--residual", metavar="", help="Also write <query>.residual.wav = mixture - estimate."),
    overwrite: bool = typer.Option(False, "--overwrite", metavar="", help="Replace existing outputs (default: keep them)."),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE", help="cpu, cuda or cuda:N (default: cuda when available)."),
    batch_size: int = typer.Option(8, "--batch-size", metavar="N", min=1, help="Chunks processed at once."),
    overlap: float = typer.Option(0.25, "--overlap", metavar="F", min=0.0, max=0.9, help="Overlap between chunks."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed for --decode sample and best-of-N."),
    raw_level: bool = typer.Option(False, "--raw-level", metavar="", help="Separate each file at its own level (default: at the level the model was trained at, outputs given the file's level back; each file is read twice)."),
    stream: bool = typer.Option(False, "--stream", metavar="", help="Live separation of one input: '-' (standard input, WAV as 'ffmpeg -i IN -f wav -' writes it) or a file. Writes DIR/<input>/<query>.wav a hop at a time, --latency after the sound arrives, and <query>.refined.wav once each hop has been re-estimated with more of what followed."),
    latency: float = typer.Option(0.5, "--latency", metavar="S", help="--stream: seconds from a sound's arrival to its first estimate, whole hops (0.25, 0.5, 1, 2)."),
    hop: float = typer.Option(0.25, "--hop", metavar="S", help="--stream: seconds between two separator passes (each over the last 2 s)."),
    refine_hops: Optional[int] = typer.Option(None, "--refine-hops", metavar="E", min=0, help="--stream: write the refined estimate of a hop E hops after its first (default: once it is final, equal to the offline result)."),
    follow: bool = typer.Option(False, "--follow", metavar="", help="--stream: the file is still being written; read it as it grows, until it has not grown for 5 s."),
    realtime: bool = typer.Option(False, "--realtime", metavar="", help="--stream: read the file at the pace it plays (demos)."),
) -> None:
    """Separate the sound a text, audio or image query describes from each PATH
    (audio/video files, or folders searched recursively; the output folder is left out).

    Examples:

      [bold]marsctl separate song.wav --query "violin"[/]

      [bold]marsctl separate ./recordings -q "dog barking" --residual[/]

      [bold]marsctl separate street.wav --span 6.3:7.0 --format flac[/]

      [bold]marsctl separate --queries per_file.csv --model runs/sup[/]

      [bold]ffmpeg -i input.mp4 -f wav - | marsctl separate --stream - -q "speech" --latency 0.5[/]

    Files that cannot be read are listed at the end and the exit status is 1.
    """
    if stream:
        return _separate_stream(paths, out, query=query, query_audio=query_audio, query_image=query_image, span=span, negative=negative,
                                negative_strength=negative_strength, model=model, encoder=encoder, decode=decode, device=device,
                                overwrite=overwrite, latency=latency, hop=hop, refine_hops=refine_hops, follow=follow, realtime=realtime)
    from marsctl.separate import InputFile, Query, SeparateOptions, Separator, check_output_folder, find_inputs, read_query_mapping
    from marsctl.separate.queries import parse_span

    with user_errors():
        jobs: list[tuple[InputFile, Query]] = []
        problems: list[str] = []
        skipped: list[Path] = []
        if queries_file is not None:
            jobs += read_query_mapping(queries_file)
        SeparateOptions(sample_rate=sample_rate, format=output_format, subtype=subtype)  # a bad format fails first
        if paths:
            if not (query or query_audio or query_image or span):
                raise typer.BadParameter("give --query, --query-audio, --query-image or --span (or a --queries mapping file)")
            the_query = Query(
                texts=tuple(query or ()), audio=tuple(map(str, query_audio or ())), images=tuple(map(str, query_image or ())),
                negative=tuple(negative or ()), negative_strength=negative_strength, spans=tuple(parse_span(s) for s in span or ()),
            )
            search = find_inputs(paths, exclude=[out])
            jobs += [(item, the_query) for item in search.files]
            problems, skipped = search.problems, search.skipped_non_audio
        elif queries_file is None:
            raise typer.BadParameter("give files or folders to separate (or a --queries mapping file)")
        if not jobs:  # an empty folder (or only non-audio files): say so, and fail
            where = ", ".join(map(str, paths or [queries_file]))
            err_console.print(f"[bold red]error:[/] nothing to separate: no audio files found in {where}"
                              + (f" ({len(skipped)} non-audio file(s) skipped)" if skipped else ""), highlight=False, soft_wrap=True)
            for message in problems:
                err_console.print(f"  {message}", highlight=False, soft_wrap=True, markup=False)
            raise typer.Exit(1)
        check_output_folder(out)  # before the model is loaded: fail fast
        separator = Separator.from_pretrained(model or "default", encoder=encoder, device=device, decode=decode,
                                              overlap=overlap, batch_size=batch_size, seed=seed, normalize_level=not raw_level)
        if model is None:
            console.print(f"using the default model shipped with marsctl ({separator.directory}); pass --model to use yours", highlight=False)
        for note in separator.out_of_vocabulary([text for _, q in jobs for text in q.texts]):
            err_console.print(f"[yellow]note:[/] {note.message()}", highlight=False, soft_wrap=True)
        separator.prepare([q for _, q in jobs], release_text_model=True)  # every query is known: free the text model
        report = _run_with_progress(separator, jobs, out, residual, overwrite,
                                    sample_rate=sample_rate, format=output_format, subtype=subtype)

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


def _separate_stream(paths, out: Path, *, query, query_audio, query_image, span, negative, negative_strength, model, encoder,
                     decode, device, overwrite, latency, hop, refine_hops, follow, realtime) -> None:
    """``--stream``: one live input into two growing files (:mod:`marsctl.separate.stream_io`)."""
    import signal
    import threading

    from marsctl.audio.stream import open_live_stream
    from marsctl.separate import Query, Separator, check_output_folder
    from marsctl.separate.stream import check_stream_decode
    from marsctl.separate.stream_io import check_stream_outputs, stream_paths, stream_to_files

    with user_errors():
        if not paths or len(paths) != 1:
            raise typer.BadParameter("--stream takes one input: '-' (standard input) or a file")
        if not (query or query_audio or query_image):
            raise typer.BadParameter("give --query, --query-audio or --query-image")
        if span:
            raise typer.BadParameter("--span cannot be used with --stream (the span would have to be heard before the stream starts)")
        check_stream_decode(decode)
        source = paths[0]
        the_query = Query(texts=tuple(query or ()), audio=tuple(map(str, query_audio or ())), images=tuple(map(str, query_image or ())),
                          negative=tuple(negative or ()), negative_strength=negative_strength)
        current, refined = stream_paths(out, "stdin" if str(source) == "-" else source.stem, the_query.output_stem())
        check_stream_outputs([current, refined], overwrite)
        check_output_folder(out)
        separator = Separator.from_pretrained(model or "default", encoder=encoder, device=device, decode=decode)
        if model is None:
            console.print(f"using the default model shipped with marsctl ({separator.directory}); pass --model to use yours", highlight=False)
        for note in separator.out_of_vocabulary(list(the_query.texts)):
            err_console.print(f"[yellow]note:[/] {note.message()}", highlight=False, soft_wrap=True)
        live = separator.stream(queries=[the_query], latency=latency, hop=hop, refine_hops=refine_hops)
        separator.prepare([the_query], release_text_model=True)
        blocks = open_live_stream(source, separator.sample_rate, follow=follow, realtime=realtime)
        err_console.print(f"streaming {'standard input' if str(source) == '-' else source}: first estimate {live.latency:g} s after the sound, "
                          f"refined {live.refined_delay:g} s after it, a pass every {live.hop:g} s (Ctrl-C stops)", highlight=False)
        stop = threading.Event()

        def request_stop(signum, frame) -> None:
            if stop.is_set():  # a second request: stop at once (the files are valid up to the last hop written)
                raise KeyboardInterrupt
            stop.set()

        previous = {number: signal.signal(number, request_stop) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            report = stream_to_files(live, blocks, current, refined, stop=stop)
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    timing = report.timing
    console.print(f"wrote {report.seconds:.2f} s to {current} and {refined}" + (" (stopped on request)" if report.stopped else ""), highlight=False)
    console.print(f"compute {report.real_time_factor:.3f} s ({report.cpu_real_time_factor:.3f} s of CPU) per second of input; slowest pass {timing.worst * 1000:.0f} ms "
                  f"({timing.cpu_worst * 1000:.0f} ms of CPU) of a {live.hop * 1000:.0f} ms hop"
                  + (f"; {timing.late} of {timing.hops} passes took longer than a hop" if timing.late else ""), highlight=False)
    if report.error:
        err_console.print(f"[bold red]the input broke off:[/] {report.error}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _run_with_progress(separator, jobs, out: Path, residual: bool, overwrite: bool, **formats):
    """Separate with two displays: files done, and seconds done within the current file."""
    from marsctl.progress import FileProgress

    with FileProgress(len({item.path for item, _ in jobs}), err_console) as progress:
        return separator.separate_files(
            jobs, out, residual=residual, overwrite=overwrite, **formats,
            on_file=lambda path: progress.file_done(path.name),
            on_progress=lambda path, done, total: progress.within(path.name, done, total),
        )


def register(app: typer.Typer) -> None:
    app.command("separate")(separate)
