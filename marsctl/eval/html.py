"""The listening page of ``marsctl eval``: ``report.html`` beside ``report.json``.

One self-contained page that works offline from the report folder (relative links only, no
script or style from elsewhere):

* the per-system and per-class tables of :mod:`marsctl.eval.tables` (mean ± SE and n), and one
  row per scored source, sortable by any column (click a header; the page opens sorted by
  SI-SDRi, worst first);
* for at most ``html_max`` mixtures, chosen by their mean SI-SDRi to span the range (the worst,
  the median and the best first, then evenly between; :func:`choose_mixtures`): an audio player
  and a log-frequency spectrogram (PNG, matplotlib) of the mixture, and of each source's
  reference, estimate(s) and residual (mixture - estimate), with the source's metrics.

Audio is written as 16-bit FLAC under ``media/`` (clipped at full scale; every browser in use
plays it), spectrograms as PNG beside it; one colour scale per mixture (its loudest bin to 80 dB
below), so that an estimate and its mixture can be compared by eye.
"""

from __future__ import annotations

import dataclasses
import html
import io
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from marsctl.eval.report import METRICS, SCORE_METRICS, EvalReport, SourceScores

#: column labels of every metric
LABELS = {**METRICS, **SCORE_METRICS}
from marsctl.files import atomic_path, write_text_atomic

#: mixtures on the listening page by default (``marsctl eval --html-max``)
DEFAULT_HTML_MAX = 12
#: dynamic range of the spectrograms, dB below the mixture's loudest bin
SPECTROGRAM_RANGE_DB = 80.0


@dataclasses.dataclass
class Clip:
    """One signal to play and look at: ``label`` (reference, estimate, residual, ...) and samples ``[T]``."""

    label: str
    wave: np.ndarray


@dataclasses.dataclass
class SourceClips:
    """A source of a mixture on the page: its name, its clips, and its report rows (one per system)."""

    name: str
    clips: list[Clip]
    rows: list[SourceScores]


@dataclasses.dataclass
class ListeningMixture:
    mixture_id: str
    sample_rate: int
    mixture: np.ndarray | None
    sources: list[SourceClips]
    #: why it was chosen, e.g. "worst (SI-SDRi -3.1 dB)"
    reason: str = ""


def mixture_scores(report: EvalReport, system: str | None = None) -> dict[str, float]:
    """Mean SI-SDRi (SI-SDR where SI-SDRi is undefined) of each mixture's sources, for rows of ``system``
    (``group["system"]``; None: rows without a system, as in a folder evaluation)."""
    values: dict[str, list[float]] = {}
    for row in report.rows:
        if row.group.get("system") != system:
            continue
        value = row.metric("si_sdri")
        value = row.metric("si_sdr") if value is None else value
        if value is not None:
            values.setdefault(row.mixture, []).append(value)
    return {mixture: float(np.mean(v)) for mixture, v in values.items()}


def choose_mixtures(scores: dict[str, float], limit: int) -> list[tuple[str, str]]:
    """At most ``limit`` mixtures ``(id, reason)`` spanning the range of ``scores``: the worst, the
    median and the best first, then the others evenly spaced in rank."""
    ranked = sorted(scores, key=lambda m: (scores[m], m))
    if limit <= 0 or not ranked:
        return []
    last = len(ranked) - 1
    picks: list[int] = []
    for index in [0, last // 2, last, *np.linspace(0, last, num=min(limit, len(ranked))).round().astype(int).tolist()]:
        if index not in picks:
            picks.append(int(index))
    names = {0: "worst", last // 2: "median", last: "best"}
    chosen = []
    for index in picks[:limit]:
        name = names.get(index, f"rank {index + 1} of {len(ranked)}")
        chosen.append((ranked[index], f"{name} (mean SI-SDRi {scores[ranked[index]]:.2f} dB)"))
    return chosen


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "x"


def _write_flac(path: Path, wave: np.ndarray, sample_rate: int) -> None:
    import soundfile as sf

    with atomic_path(path) as tmp:
        sf.write(str(tmp), np.clip(np.nan_to_num(wave.astype(np.float32)), -1.0, 1.0), sample_rate, subtype="PCM_16", format="FLAC")


def _stft_db(wave: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy.signal import stft

    frequencies, times, z = stft(np.nan_to_num(wave.astype(np.float64)), fs=sample_rate, nperseg=512, noverlap=384)
    return frequencies, times, 20 * np.log10(np.abs(z) + 1e-10)


def write_spectrogram(path: Path, wave: np.ndarray, sample_rate: int, top_db: float) -> None:
    """A log-frequency spectrogram PNG of ``wave``, colours from ``top_db`` down :data:`SPECTROGRAM_RANGE_DB`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    frequencies, times, db = _stft_db(wave, sample_rate)
    figure = Figure(figsize=(3.6, 1.5), dpi=80)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.14, 0.2, 0.84, 0.76))
    axes.pcolormesh(times, frequencies[1:], db[1:], shading="auto", cmap="magma", vmin=top_db - SPECTROGRAM_RANGE_DB, vmax=top_db,
                    rasterized=True)
    axes.set_yscale("log")
    axes.set_ylim(max(frequencies[1], 40.0), sample_rate / 2)
    axes.set_xlabel("s", fontsize=7, labelpad=1)
    axes.set_ylabel("Hz", fontsize=7, labelpad=1)
    axes.tick_params(labelsize=6, pad=1)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _cell(value: float | None, digits: int = 2) -> str:
    sort_key = "" if value is None or not math.isfinite(value) else repr(float(value))
    return f'<td class="num" data-sort="{sort_key}">{_number(value, digits)}</td>'


def _digits(metric: str) -> int:
    return 4 if metric == "stft_distance" else 2


def _summary_tables(report: EvalReport, group_keys: Sequence[str]) -> list[str]:
    """Per-system (and per-class) tables, or for one system the overall row and one table per group key."""
    from marsctl.eval.tables import SHORT_LABELS, system_entries

    parts: list[str] = []
    metrics = list(report.metrics)
    if not report.single_system:
        for title, entries in (("Per system", system_entries(report)), ("Per class", system_entries(report, by_class=True))):
            by_class = bool(entries) and "label" in entries[0]
            head = ["system", "query", *(["class"] if by_class else []), "n", *(SHORT_LABELS[m] for m in metrics)]
            rows = []
            for e in entries:
                text = [e["system"], e["query_modality"], *([e["label"]] if by_class else [])]
                cells = "".join(f"<td>{html.escape(str(t))}</td>" for t in text) + f'<td class="num" data-sort="{e["n"]}">{e["n"]}</td>'
                for m in metrics:
                    mean, se = e.get(f"{m}_mean"), e.get(f"{m}_se")
                    shown = _number(mean, _digits(m)) + ("" if se is None else f" ± {_number(se, _digits(m))}")
                    cells += f'<td class="num" data-sort="{"" if mean is None else repr(float(mean))}">{shown}</td>'
                rows.append(f"<tr>{cells}</tr>")
            parts.append(_table(title, head, rows, table_id=_slug(title.lower())))
        return parts
    groups = [("all", [("all", report.summary(), len(report.rows))])]
    groups += [(key, [(g.key[0], g.metrics, g.n) for g in sorted(report.grouped((key,)), key=lambda g: g.key)]) for key in group_keys]
    for key, entries in groups:
        head = [key if key != "all" else "", "n", *(LABELS.get(m, m) for m in metrics)]
        rows = []
        for name, summary, n in entries:
            cells = f"<td>{html.escape(str(name))}</td>" + f'<td class="num" data-sort="{n}">{n}</td>'
            for m in metrics:
                s = summary[m]
                shown = s.format(_digits(m)) + ("" if s.count in (n, 0) else f" (n={s.count})")
                cells += f'<td class="num" data-sort="{"" if s.mean is None else repr(float(s.mean))}">{html.escape(shown)}</td>'
            rows.append(f"<tr>{cells}</tr>")
        parts.append(_table("Summary" if key == "all" else f"By {key}", head, rows, table_id=f"by-{_slug(key)}"))
    return parts


def _table(title: str, head: Sequence[str], rows: Sequence[str], table_id: str) -> str:
    header = "".join(f'<th scope="col">{html.escape(h)}</th>' for h in head)
    return (f'<h2>{html.escape(title)}</h2>\n<table class="sortable" id="{table_id}"><thead><tr>{header}</tr></thead>\n'
            f'<tbody>\n{chr(10).join(rows)}\n</tbody></table>')


def _sources_table(report: EvalReport, shown: dict[str, str]) -> str:
    metrics = list(report.metrics)
    systems = any("system" in r.group for r in report.rows)
    head = ["mixture", "source", *(["system"] if systems else []), *(LABELS.get(m, m) for m in metrics), "note"]
    rows = []
    for r in report.rows:
        anchor = shown.get(r.mixture)
        name = html.escape(r.mixture)
        mixture = f'<a href="#{anchor}">{name}</a>' if anchor else name
        cells = f"<td>{mixture}</td><td>{html.escape(r.source)}</td>"
        if systems:
            cells += f"<td>{html.escape(r.group.get('system', ''))}</td>"
        cells += "".join(_cell(r.metric(m), _digits(m)) for m in metrics) + f'<td class="note">{html.escape(r.note)}</td>'
        rows.append(f'<tr class="source-row">{cells}</tr>')
    title = f"Sources ({len(report.rows)} rows; click a header to sort)"
    return _table(title, head, rows, table_id="sources")


def _metric_line(rows: Sequence[SourceScores], metrics: Sequence[str]) -> str:
    lines = []
    for r in rows:
        system = r.group.get("system")
        values = ", ".join(f"{LABELS.get(m, m).split(' (')[0]} {_number(r.metric(m), _digits(m))}" for m in metrics if r.metric(m) is not None)
        lines.append(f"<li>{html.escape((system + ': ') if system else '')}{html.escape(values)}</li>")
    return "<ul class=\"metrics\">" + "".join(lines) + "</ul>"


def _figure(out: Path, folder: Path, name: str, clip: Clip, sample_rate: int, top_db: float) -> str:
    stem = _slug(name)
    _write_flac(out / folder / f"{stem}.flac", clip.wave, sample_rate)
    write_spectrogram(out / folder / f"{stem}.png", clip.wave, sample_rate, top_db)
    src = (folder / stem).as_posix()
    label = html.escape(clip.label)
    return (f'<figure class="clip"><figcaption>{label}</figcaption>'
            f'<audio controls preload="none" src="{src}.flac"></audio>'
            f'<img src="{src}.png" alt="spectrogram: {label}" width="288" height="120"></figure>')


def write_html_report(report: EvalReport, out_dir: str | Path, listening: Sequence[ListeningMixture],
                      group_keys: Sequence[str] = (), title: str = "Evaluation") -> Path:
    """Write ``report.html`` (and its ``media/``) into ``out_dir``; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in report.metrics]
    shown = {m.mixture_id: f"mix-{i}-{_slug(m.mixture_id)}" for i, m in enumerate(listening)}
    sections = []
    for i, mix in enumerate(listening):
        folder = Path("media") / f"{i:03d}-{_slug(mix.mixture_id)}"
        loud = [c.wave for s in mix.sources for c in s.clips] + ([mix.mixture] if mix.mixture is not None else [])
        top_db = max(float(_stft_db(w, mix.sample_rate)[2].max()) for w in loud)
        figures = [_figure(out, folder, "mixture", Clip("mixture", mix.mixture), mix.sample_rate, top_db)] if mix.mixture is not None else []
        blocks = []
        for s in mix.sources:
            clips = "".join(_figure(out, folder, f"{s.name}-{c.label}", c, mix.sample_rate, top_db) for c in s.clips)
            blocks.append(f'<div class="source"><h4>{html.escape(s.name)}</h4>{_metric_line(s.rows, metrics)}'
                          f'<div class="clips">{clips}</div></div>')
        sections.append(f'<section class="mixture" id="{shown[mix.mixture_id]}"><h3>{html.escape(mix.mixture_id)}'
                        f' <small>{html.escape(mix.reason)}</small></h3><div class="clips">{"".join(figures)}</div>'
                        f'{"".join(blocks)}</section>')
    settings = "".join(f"<li><code>{html.escape(str(k))}</code>: {html.escape(str(v))}</li>"
                       for k, v in report.settings.items() if v not in (None, "", [], {}))
    failures = "".join(f"<li><code>{html.escape(f.path)}</code>: {html.escape(f.reason)}</li>" for f in report.failures)
    n_mixtures = len({r.mixture for r in report.rows})
    n_sources = len({(r.mixture, r.source) for r in report.rows})
    systems = sorted({r.group["system"] for r in report.rows if "system" in r.group})
    counted = f"{n_sources} sources in {n_mixtures} mixtures" + (f", each scored for {len(systems)} systems ({', '.join(systems)})" if systems else "")
    listening_note = (f"{len(listening)} of {n_mixtures} mixtures, chosen by mean SI-SDRi (the worst, the median and the best, "
                      "then evenly between; <code>--html-max</code> sets how many)" if listening else "no mixtures (<code>--html-max 0</code>)")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(counted)}. Mean ± standard error over sources; silent or failed estimates
are scored at the floor and kept in the means. Spectrograms: log frequency, one colour scale per mixture
({SPECTROGRAM_RANGE_DB:g} dB range).</p>
<details><summary>Settings</summary><ul>{settings}</ul></details>
{chr(10).join(_summary_tables(report, group_keys))}
{_sources_table(report, shown)}
{f'<h2>Failures ({len(report.failures)})</h2><ul>{failures}</ul>' if failures else ''}
<h2>Listening</h2>
<p>{listening_note}.</p>
{chr(10).join(sections)}
<script>{_SCRIPT}</script>
</body></html>
"""
    path = out / "report.html"
    write_text_atomic(path, page)
    return path


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: 2px 8px; text-align: left; }
th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
th.sorted-asc::after { content: " \\25B2"; } th.sorted-desc::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.note { color: #666; font-size: 12px; }
section.mixture { border-top: 2px solid #ccc; margin-top: 1em; }
.clips { display: flex; flex-wrap: wrap; gap: 8px; }
figure.clip { margin: 0; padding: 4px; border: 1px solid #eee; }
figure.clip audio { width: 288px; display: block; }
figcaption { font-size: 12px; color: #444; }
ul.metrics { margin: 0; font-size: 12px; }
h4 { margin: 0.6em 0 0.2em; }
"""

_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.addEventListener("click", function () { sortTable(table, column, th.classList.contains("sorted-asc")); });
  });
});
function sortTable(table, column, descending) {
  var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
  function key(row) {
    var cell = row.cells[column], value = cell.getAttribute("data-sort");
    if (value === null) return cell.textContent;
    return value === "" ? NaN : parseFloat(value);
  }
  rows.sort(function (a, b) {
    var x = key(a), y = key(b);
    if (typeof x === "number" || typeof y === "number") {
      if (isNaN(x)) return 1; if (isNaN(y)) return -1;  /* undefined values last */
      return descending ? y - x : x - y;
    }
    return descending ? String(y).localeCompare(x) : String(x).localeCompare(y);
  });
  rows.forEach(function (row) { body.appendChild(row); });
  table.querySelectorAll("th").forEach(function (th) { th.classList.remove("sorted-asc", "sorted-desc"); });
  table.querySelectorAll("th")[column].classList.add(descending ? "sorted-desc" : "sorted-asc");
}
(function () {  /* open the sources table sorted by SI-SDRi, worst first */
  var table = document.getElementById("sources");
  if (!table) return;
  var heads = table.querySelectorAll("th");
  for (var i = 0; i < heads.length; i++) if (heads[i].textContent.indexOf("SI-SDRi") === 0) { sortTable(table, i, false); break; }
})();
"""


def folder_listening(report: EvalReport, estimates_dir: Path, references_dir: Path, mixtures_dir: Path | None,
                     limit: int) -> list[ListeningMixture]:
    """The mixtures of a folder evaluation to put on the page (:func:`choose_mixtures`), loaded as scored."""
    from marsctl.eval.folders import discover_mixtures, load_mixture

    chosen = choose_mixtures(mixture_scores(report), limit)
    entries = {e.mixture_id: e for e in discover_mixtures(references_dir, estimates_dir, mixtures_dir)[0]}
    rows = _rows_by_source(report)
    out = []
    for mixture_id, reason in chosen:
        loaded = load_mixture(entries[mixture_id], []) if mixture_id in entries else None
        if loaded is None:
            continue
        mixture = None if loaded.mixture is None else loaded.mixture.numpy()
        sources = []
        for name, reference, estimate in zip(loaded.names, loaded.references.numpy(), loaded.estimates.numpy()):
            clips = [Clip("reference", reference), Clip("estimate", estimate)]
            if mixture is not None:
                clips.append(Clip("residual", mixture - estimate))
            sources.append(SourceClips(name, clips, rows.get((mixture_id, name), [])))
        out.append(ListeningMixture(mixture_id, loaded.sample_rate, mixture, sources, reason))
    return out


def _rows_by_source(report: EvalReport) -> dict[tuple[str, str], list[SourceScores]]:
    rows: dict[tuple[str, str], list[SourceScores]] = {}
    for r in report.rows:
        rows.setdefault((r.mixture, r.source), []).append(r)
    return rows
