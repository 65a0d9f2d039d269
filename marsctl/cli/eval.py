"""``marsctl eval``: score separated audio with SDR/SIR/SAR, SI-SDR(i) and STFT distance."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import List, Optional

import typer

from marsctl.cli.common import console, err_console, user_errors
from marsctl.cli.hub import PUSH_TO_OPTION, REUSE_OPTION
from marsctl.cli.progress import track
from marsctl.errors import MarsctlError
from marsctl.metrics.folders import evaluate_folders
from marsctl.metrics.report import summary_table, write_report

HELP = """Score separated audio against references (BSS-Eval SDR/SIR/SAR, SI-SDR, SI-SDRi, STFT distance).

Folders: ESTIMATES and REFERENCES hold one sub-folder per mixture with one file per source,
under the same names (e.g. references/mix001/violin.wav and estimates/mix001/violin.wav).
The sources of a mixture are scored jointly, so SIR measures leakage between them. SI-SDRi
needs the mixture: references/<mixture>/mixture.wav, or <MIXTURES>/<mixture>.wav.

Writes report.json, scores.csv (one row per source), summary.csv and summary.md to --out,
and prints mean ± standard error. Files that cannot be scored are listed at the end and
make the exit status 1.

Example:  marsctl eval --estimates sep/ --references refs/ --out report/

A separator: --model M --data D separates D's fixed test mixtures, each source with its own
query (--query-modality text|audio|image|omni), and scores it beside the unprocessed mixture
and the ideal-ratio-mask oracle, plus the CLAP score; writes the same files plus
model_summary.md/.json (per system, query modality and class).

Example:  marsctl eval --model runs/sup --data data/soundfont --query-modality text --out report/
"""


def eval_command(
    estimates: Optional[Path] = typer.Option(None, "--estimates", "-e", help="Folder of separated sources (one sub-folder per mixture)."),
    references: Optional[Path] = typer.Option(None, "--references", "-r", help="Folder of reference sources, same layout and names."),
    mixtures: Optional[Path] = typer.Option(
        None, "--mixtures", "-m", help="Folder of mixtures as <mixture>.wav, for SI-SDRi (default: references/<mixture>/mixture.wav)."
    ),
    out: Path = typer.Option(Path("eval_report"), "--out", "-o", help="Folder for report.json, scores.csv, summary.csv and summary.md."),
    by_source: bool = typer.Option(False, "--by-source", help="Also summarize per source name (e.g. per instrument)."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout instead of tables."),
    model: Optional[str] = typer.Option(None, "--model", help="Evaluate a separator (run directory or Hub id; 'default' = the shipped one) on --data instead of folders."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Dataset directory (or Hub id) whose fixed test mixtures --model separates, each source with its own query."),
    query_modality: Optional[List[str]] = typer.Option(None, "--query-modality", help="text (default), audio (another clip of the class), image (the source's video frame) or omni; repeat for several."),
    split: str = typer.Option("test", "--split", help="With --data: which split's fixed mixtures."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="With --data: only the first N mixtures."),
    clap_encoder: Optional[str] = typer.Option(None, "--clap-encoder", help="With --data: encoder for the CLAP score (default: the model's query encoder), e.g. laion-clap:630k-audioset."),
    device: Optional[str] = typer.Option(None, "--device", help="With --data: cuda or cpu."),
    push_to: Optional[str] = PUSH_TO_OPTION,
    reuse: bool = REUSE_OPTION,
) -> None:
    with user_errors():
        if model is not None or data is not None:
            _eval_model(model, data, query_modality or ["text"], split, limit, clap_encoder, device, out, json_output,
                        push_to=push_to, reuse=reuse)
            return
        if push_to or reuse:
            raise typer.BadParameter("--push-to and --reuse apply to --model/--data evaluations")
        if estimates is None or references is None:
            raise typer.BadParameter("give --estimates and --references (folders), or --model and --data")
        report = evaluate_folders(
            estimates, references, mixtures, progress=lambda it, total, desc: track(it, total, desc, err_console)
        )
        if not report.rows and report.failures:
            for failure in report.failures:
                err_console.print(f"[red]failed:[/] {failure}", highlight=False, soft_wrap=True)
            raise MarsctlError(f"no mixture could be scored ({len(report.failures)} failures)")
        group_keys = ("source",) if by_source else ()
        paths = write_report(report, out, group_keys)
        if json_output:
            print(json.dumps({**report.to_dict(group_keys), "outputs": {k: str(p) for k, p in paths.items()}}, indent=2))
        else:
            console.print(summary_table(report, title=f"{len(report.rows)} sources in {len({r.mixture for r in report.rows})} mixtures"))
            if by_source:
                console.print(summary_table(report, title="By source", group_key="source"))
            console.print(f"Wrote {paths['json']}, {paths['scores_csv'].name}, {paths['summary_csv'].name}, {paths['markdown'].name}")
        if report.failures:
            err_console.print(f"[bold red]{len(report.failures)} file(s) failed:[/]")
            for failure in report.failures:
                err_console.print(f"  {failure}", highlight=False, soft_wrap=True)
            raise typer.Exit(1)


def _eval_model(model, data, modalities, split, limit, clap_encoder, device, out, json_output, *, push_to=None, reuse=False) -> None:
    """``--model M --data D``: marsctl.evaluation separates and scores; this prints."""
    from marsctl.evaluation import evaluate_model_on_dataset, summarize, summary_rich_table
    from marsctl.hub import optional_artifact, resolve_artifact, run_stage

    if data is None:
        raise typer.BadParameter("--model needs --data (the dataset whose fixed test mixtures to separate)")
    model = None if model in (None, "default") else model
    produced: dict = {}

    def _evaluate() -> dict:
        with track_mixtures() as on_mixture:
            produced["rows"], produced["paths"] = evaluate_model_on_dataset(model, data, out, modalities, split, limit, clap_encoder, device, on_mixture)
        return summarize(produced["rows"])

    # --reuse / --push-to: the report is keyed by the model, the data and the evaluation settings
    inputs = {"model": optional_artifact(model, "model"), "data": resolve_artifact(data, "dataset"),
              "clap_encoder": optional_artifact(clap_encoder, "model")}
    settings = {"modalities": sorted(modalities), "split": split, "limit": limit,
                "model": None if inputs["model"] else (model or "default"),
                "clap_encoder": None if inputs["clap_encoder"] else clap_encoder}
    outcome = run_stage("eval", settings, inputs, out, _evaluate, kind="eval-report", reuse=reuse, push_to=push_to)
    if outcome.reused:
        console.print(f"reused the evaluation report made with the same model, data and settings: {outcome.path}", highlight=False)
        return
    if outcome.pushed is not None:
        err_console.print(f"pushed to the Hub: {outcome.pushed.spec}", highlight=False)
    rows, paths = produced["rows"], produced["paths"]
    if json_output:
        print(json.dumps({"summary": summarize(rows), "outputs": {k: str(p) for k, p in paths.items()}}, indent=2))
    else:
        console.print(summary_rich_table(summarize(rows), title=f"{len(rows)} scored sources (mixture, model, ideal-ratio-mask oracle)"))
        console.print(f"Wrote {', '.join(p.name for p in paths.values())} to {out}")


@contextlib.contextmanager
def track_mixtures():
    from rich.progress import Progress

    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("Separating and scoring mixtures", total=None)
        yield lambda mixture_id: progress.advance(task)


def register(app: typer.Typer) -> None:
    app.command("eval", help=HELP, no_args_is_help=True)(eval_command)
