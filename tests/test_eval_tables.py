"""The CLI's summary tables fit 80 columns without cutting source names (issue 28: "acoustic-gu / itar")."""

from __future__ import annotations

import io

from rich.console import Console

from marsctl.eval.report import EvalReport, SourceScores
from marsctl.eval.tables import summary_table


def test_by_source_table_keeps_names_whole_at_80_columns():
    names = ("acoustic-guitar", "jet-plane-flying", "cello")
    rows = [SourceScores(f"m{i}", name, sdr=-12.34 * i, sir=19.16, sar=14.05, si_sdr=-10.39 * i, si_sdri=-15.14 * i, stft_distance=0.0771)
            for i in (1, 2) for name in names]
    console = Console(file=io.StringIO(), width=80, force_terminal=False)
    console.print(summary_table(EvalReport(rows, []), title="By source (dB)", group_key="source"))
    lines = console.file.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert all(any(line.split() and line.split()[0] == name for line in lines) for name in names), "\n".join(lines)
    assert any(line.rstrip().endswith(" 2") for line in lines)  # the n column is not cut off
