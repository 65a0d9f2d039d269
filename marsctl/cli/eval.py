"""``marsctl eval``: parse, call :mod:`marsctl.eval`, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from marsctl.cli.common import console, err_console, user_errors
from marsctl.cli.hub import PUSH_TO_OPTION, REUSE_OPTION
from marsctl.errors import MarsctlError
from marsctl.progress import stage_progress, track

#: marsctl.eval.scoring.DB_FLOOR, spelled here so that every `marsctl` command does not import the
#: metrics stack (numba, scipy, fast_bss_eval) to build this help text (tests/test_eval_cli.py checks it)
DB_FLOOR_IN_HELP = -60.0

HELP = """Score separated audio against references: BSS-Eval SDR/SIR/SAR, SI-SDR, SI-SDRi and STFT distance.

Folders: --estimates and --references hold one sub-folder per mixture with one file per source, under the same names (references/mix001/violin.wav and estimates/mix001/violin.wav). The sources of a mixture are scored jointly, so SIR measures the leakage between them. SI-SDRi needs the mixture, as mixture.wav beside the references or as MIXTURES/<mixture>.wav.

Writes report.json, scores.csv (one row per source), summary.csv, summary.md and report.html (a listening page: players, spectrograms, sortable tables; --html-max mixtures) to --out, and prints mean ± standard error and n. A silent estimate is scored at the floor, {floor:g} dB. Files that cannot be scored are listed at the end and make the exit status 1.

Example: marsctl eval -e sep/ -r refs/ -o report/

A separator: --model M --data D separates the fixed test mixtures of D, each source with its own query (--query-modality text, audio, image, omni or span), and scores it beside the unprocessed mixture and the ideal-ratio-mask oracle. It writes the same files plus model_summary.md and model_summary.json, per system, query modality and class; never one mean across systems.

Text-audio scores (100 x cosine of the label's text and the estimate's audio embedding): "Reward enc." (reward_encoder_score) uses the encoder RL optimises: the reward encoder the model's RL run recorded when it is a local folder (or 'default'), else the model's own query encoder; so it is not independent. --judge SPEC adds "Judge" (judge_score) from another encoder (an aligned encoder folder, builtin, laion-clap:630k-audioset or a Hub id). A judge with the same weights as the model's encoder or its RL run's reward encoder is refused.

Example: marsctl eval -m runs/rl -d data/sf --judge laion-clap:630k-audioset
""".format(floor=DB_FLOOR_IN_HELP)


def eval_command(
    estimates: Optional[Path] = typer.Option(None, "--estimates", "-e", metavar="DIR", help="Folder of separated sources (one sub-folder per mixture)."),
    references: Optional[Path] = typer.Option(None, "--references", "-r", metavar="DIR", help="Folder of reference sources, same layout and names."),
    mixtures: Optional[Path] = typer.Option(
        None, "--mixtures", metavar="DIR", help="Folder of mixtures as <mixture>.wav, for SI-SDRi (default: mixture.wav beside the references). Folders only."
    ),
    out: Path = typer.Option(Path("eval_report"), "--out", "-o", metavar="DIR", help="Folder for report.json, scores.csv, summary.csv and summary.md."),
    by_source: bool = typer.Option(False, "--by-source", help="Also summarize per source name (e.g. per instrument)."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout instead of tables."),
    model: Optional[str] = typer.Option(None, "--model", "-m", metavar="RUN", help="Evaluate a separator (run directory or Hub id; 'default' = the shipped one) on --data instead of folders."),
    data: Optional[str] = typer.Option(None, "--data", "-d", metavar="DATASET", help="Dataset directory (or Hub id) whose fixed test mixtures --model separates, each source with its own query."),
    query_modality: Optional[List[str]] = typer.Option(None, "--query-modality", metavar="MODALITY", help="text (default), audio (another clip of the class), image (the source's video frame), omni, or span (1 s of the mixture where the source is most active); repeat for several."),
    split: str = typer.Option("test", "--split", metavar="SPLIT", help="With --data: which split's fixed mixtures."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, metavar="N", help="With --data: only the first N mixtures."),
    judge: Optional[str] = typer.Option(None, "--judge", metavar="SPEC", help="With --data: an independent encoder for the judge score (not the model's own), e.g. laion-clap:630k-audioset or an aligned encoder folder."),
    clap_encoder: Optional[str] = typer.Option(None, "--clap-encoder", metavar="SPEC", hidden=True, help="Former name of --judge."),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE", help="With --data: cuda or cpu."),
    html_max: int = typer.Option(12, "--html-max", min=0, metavar="N", help="Mixtures on the listening page report.html (players and spectrograms): the worst, the median, the best, then evenly between; 0: tables only."),
    push_to: Optional[str] = PUSH_TO_OPTION,
    reuse: bool = REUSE_OPTION,
) -> None:
    with user_errors():
        if model is not None or data is not None:
            for name, value in (("--estimates", estimates), ("--references", references), ("--mixtures", mixtures)):
                if value is not None:
                    raise MarsctlError(f"{name} scores folders; it cannot be combined with --model/--data")
            if clap_encoder is not None:
                if judge is not None:
                    raise MarsctlError("--clap-encoder is the former name of --judge; give only --judge")
                err_console.print("[yellow]note:[/] --clap-encoder is now --judge (an independent judge encoder)", highlight=False)
                judge = clap_encoder
            _eval_model(model, data, query_modality or ["text"], split, limit, judge, device, out, json_output,
                        push_to=push_to, reuse=reuse, html_max=html_max)
            return
        if push_to or reuse:
            raise typer.BadParameter("--push-to and --reuse apply to --model/--data evaluations")
        if judge is not None or clap_encoder is not None:
            raise typer.BadParameter("--judge applies to --model/--data evaluations")
        if estimates is None or references is None:
            raise typer.BadParameter("give --estimates and --references (folders), or --model and --data")
        from marsctl.eval import evaluate_folders, write_report
        from marsctl.eval.scoring import DB_FLOOR
        from marsctl.eval.tables import summary_table

        report = evaluate_folders(
            estimates, references, mixtures, progress=lambda it, total, desc: track(it, total, desc, err_console)
        )
        floored = sum("scored at the floor" in r.note for r in report.rows)
        if floored:
            err_console.print(f"[yellow]note:[/] {floored} silent estimate(s) scored at the floor ({DB_FLOOR:g} dB) and kept in the means", highlight=False)
        if not report.rows and report.failures:
            for failure in report.failures:
                err_console.print(f"[red]failed:[/] {failure}", highlight=False, soft_wrap=True)
            raise MarsctlError(f"no mixture could be scored ({len(report.failures)} failures)")
        group_keys = ("source",) if by_source else ()
        paths = write_report(report, out, group_keys)
        from marsctl.eval.html import folder_listening, write_html_report

        listening = folder_listening(report, estimates, references, mixtures, html_max)
        paths["html"] = write_html_report(report, out, listening, group_keys, title=f"Evaluation of {estimates}")
        if json_output:
            print(json.dumps({**report.to_dict(group_keys), "outputs": {k: str(p) for k, p in paths.items()}}, indent=2))
        else:
            console.print(summary_table(report, title=f"{len(report.rows)} sources in {len({r.mixture for r in report.rows})} mixtures (dB)"))
            if by_source:
                console.print(summary_table(report, title="By source (dB)", group_key="source"))
            console.print(f"Wrote {paths['json']}, {paths['scores_csv'].name}, {paths['summary_csv'].name}, {paths['markdown'].name}, "
                          f"{paths['html'].name} (open it in a browser to listen)", highlight=False)
        if report.failures:
            err_console.print(f"[bold red]{len(report.failures)} file(s) failed:[/]")
            for failure in report.failures:
                err_console.print(f"  {failure}", highlight=False, soft_wrap=True)
            raise typer.Exit(1)


def _eval_model(model, data, modalities, split, limit, judge, device, out, json_output, *, push_to=None, reuse=False, html_max=12) -> None:
    """``--model M --data D``: marsctl.eval.model separates and scores; this prints."""
    from marsctl.eval.model import count_test_mixtures, evaluate_model_on_dataset, summarize
    from marsctl.eval.tables import RICH_SCORE_METRICS, summary_rich_table
    from marsctl.hub import optional_artifact, resolve_artifact, run_stage

    if data is None:
        raise typer.BadParameter("--model needs --data (the dataset whose fixed test mixtures to separate)")
    model = None if model in (None, "default") else model
    produced: dict = {}

    def _evaluate() -> dict:
        total = count_test_mixtures(inputs["data"], split, limit)
        with stage_progress("Separating and scoring mixtures", total, console=err_console) as advance:
            on_mixture = lambda mixture_id: advance()  # noqa: E731
            produced["rows"], produced["paths"] = evaluate_model_on_dataset(model, data, out, modalities, split, limit, judge, device, on_mixture,
                                                                            html_max=html_max)
        return summarize(produced["rows"])

    # --reuse / --push-to: the report is keyed by the model, the data and the evaluation settings
    inputs = {"model": optional_artifact(model, "model"), "data": resolve_artifact(data, "dataset"),
              "judge": optional_artifact(judge, "model")}
    settings = {"modalities": sorted(modalities), "split": split, "limit": limit,
                "model": None if inputs["model"] else (model or "default"),
                "judge": None if inputs["judge"] else judge}
    outcome = run_stage("eval", settings, inputs, out, _evaluate, kind="eval-report", reuse=reuse, push_to=push_to)
    if outcome.reused:
        console.print(f"reused the evaluation report made with the same model, data and settings: {outcome.path}", highlight=False)
        return
    if outcome.pushed is not None:
        err_console.print(f"pushed to the Hub: {outcome.pushed.spec}", highlight=False)
    rows, paths = produced["rows"], produced["paths"]
    if json_output:
        print(json.dumps({"summary": summarize(rows), "judge": judge, "outputs": {k: str(p) for k, p in paths.items()}}, indent=2))
    else:
        entries = summarize(rows)
        console.print(summary_rich_table(entries, title=f"{len(rows)} scored sources (mixture, model, ideal-ratio-mask oracle)"))
        console.print(summary_rich_table(entries, title="Text-audio scores (100 x cosine)", metrics=RICH_SCORE_METRICS))
        if judge:
            console.print(f"Judge: {judge}, independent of the model. Reward enc.: the encoder RL optimises (the reward "
                          "encoder the model's RL run recorded, else its own query encoder; named in summary.md), so it is "
                          "not independent.", highlight=False)
        else:
            err_console.print("[yellow]note:[/] no independent judge given (--judge SPEC): 'Reward enc.' is the score of the "
                              "encoder RL optimises, so it is not independent", highlight=False)
        console.print(f"Wrote {', '.join(p.name for p in paths.values())} to {out}")


def register(app: typer.Typer) -> None:
    app.command("eval", help=HELP, no_args_is_help=True)(eval_command)
