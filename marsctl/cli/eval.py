"""``marsctl eval``: score separated audio with SDR/SIR/SAR, SI-SDR(i) and STFT distance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from marsctl.cli.common import console, err_console, user_errors
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
"""


def eval_command(
    estimates: Path = typer.Option(..., "--estimates", "-e", help="Folder of separated sources (one sub-folder per mixture)."),
    references: Path = typer.Option(..., "--references", "-r", help="Folder of reference sources, same layout and names."),
    mixtures: Optional[Path] = typer.Option(
        None, "--mixtures", "-m", help="Folder of mixtures as <mixture>.wav, for SI-SDRi (default: references/<mixture>/mixture.wav)."
    ),
    out: Path = typer.Option(Path("eval_report"), "--out", "-o", help="Folder for report.json, scores.csv, summary.csv and summary.md."),
    by_source: bool = typer.Option(False, "--by-source", help="Also summarize per source name (e.g. per instrument)."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout instead of tables."),
) -> None:
    with user_errors():
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


def register(app: typer.Typer) -> None:
    app.command("eval", help=HELP, no_args_is_help=True)(eval_command)
