"""The listening page of `marsctl eval` (issue 28, item 3): report.html with players, spectrograms and
sortable tables, checked in a real browser (headless Chromium from Debian) served from the report folder."""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from marsctl.cli.main import app
from marsctl.eval.html import choose_mixtures

SR = 16_000
T = 12_000


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture()
def report_dir(tmp_path):
    """Four two-source mixtures (estimates from good to bad), evaluated by the CLI with --html-max 3."""
    rng = np.random.default_rng(0)
    refs, ests = tmp_path / "refs", tmp_path / "ests"
    for i in range(4):
        a = np.convolve(rng.standard_normal(T), np.hanning(16), "same") * 0.1
        b = 0.2 * np.sin(2 * np.pi * (300 + 100 * i) * np.arange(T) / SR)
        for folder, name, wave in ((refs, "dog", a), (refs, "violin", b), (refs, "mixture", a + b),
                                   (ests, "dog", a + 0.2 * (i + 1) * b), (ests, "violin", b + 0.2 * (i + 1) * a)):
            (folder / f"mix{i}").mkdir(parents=True, exist_ok=True)
            sf.write(folder / f"mix{i}" / f"{name}.wav", wave.astype(np.float32), SR, subtype="FLOAT")
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["eval", "-e", str(ests), "-r", str(refs), "-o", str(out), "--by-source", "--html-max", "3"])
    assert result.exit_code == 0, result.output
    return out


def test_choose_mixtures_starts_with_the_worst_the_median_and_the_best():
    scores = {f"m{i}": float(s) for i, s in enumerate([5, 1, 9, 3, 7, 2, 8])}
    chosen = choose_mixtures(scores, 3)
    assert [m for m, _ in chosen] == ["m1", "m0", "m2"]  # 1 (worst), 5 (median of 7), 9 (best)
    assert [r.split()[0] for _, r in chosen] == ["worst", "median", "best"]
    assert len(choose_mixtures(scores, 5)) == 5 and len({m for m, _ in choose_mixtures(scores, 50)}) == 7
    assert choose_mixtures(scores, 0) == []


def test_the_page_is_bounded_and_uses_relative_links_only(report_dir):
    page = (report_dir / "report.html").read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert links and all(not re.match(r"[a-z]+:|/", link) for link in links)  # no CDN, no absolute path
    assert len(list((report_dir / "media").iterdir())) == 3  # --html-max 3 of the 4 mixtures
    assert page.count("<audio ") == 3 * (1 + 2 * 3)  # mixture, and reference, estimate, residual per source
    assert "mix3" in page.split("Listening")[1]  # the worst estimates are on the page


_CHECK = """
<script>
window.addEventListener("load", async function () {
  const images = Array.from(document.images).map(img => ({src: img.getAttribute("src"), ok: img.complete && img.naturalWidth > 0}));
  const audio = await Promise.all(Array.from(document.querySelectorAll("audio")).map(a => new Promise(resolve => {
    const done = ok => resolve({src: a.getAttribute("src"), ok: ok, duration: a.duration});
    a.addEventListener("loadedmetadata", () => done(true));
    a.addEventListener("error", () => done(false));
    a.preload = "auto"; a.load();
  })));
  const rows = document.querySelectorAll("#sources tbody tr").length;
  const first = document.querySelector("#sources tbody tr td:nth-child(2)").textContent;
  const pre = document.createElement("pre"); pre.id = "result";
  pre.textContent = JSON.stringify({images, audio, rows, first});
  document.body.appendChild(pre);
});
</script>
"""


class _Recorder(http.server.SimpleHTTPRequestHandler):
    requests: list[tuple[str, int]] = []

    def log_request(self, code="-", size="-"):
        self.requests.append((self.path, int(code)))

    def log_message(self, *args):
        pass


@pytest.mark.skipif(_browser() is None, reason="chromium is not installed (apt-get install chromium; README's ci:system line installs it in CI)")
def test_every_player_and_spectrogram_resolves_in_headless_chromium(report_dir, tmp_path):
    page = (report_dir / "report.html").read_text()
    (report_dir / "check.html").write_text(page.replace("</body>", _CHECK + "</body>"))
    _Recorder.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Recorder, directory=str(report_dir)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = subprocess.run(
            [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--autoplay-policy=no-user-gesture-required",
             "--virtual-time-budget=20000", "--dump-dom", f"http://127.0.0.1:{server.server_address[1]}/check.html"],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        server.shutdown()
    found = re.search(r'<pre id="result">(.*?)</pre>', result.stdout, re.S)
    assert found, result.stderr[-2000:]
    state = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    scores = json.loads((report_dir / "report.json").read_text())
    assert state["rows"] == len(scores["rows"]) == 8  # one row per scored source
    assert len(state["images"]) == len(state["audio"]) == 3 * 7 and all(i["ok"] for i in state["images"]), state["images"]
    assert all(a["ok"] and abs(a["duration"] - T / SR) < 0.01 for a in state["audio"]), state["audio"]
    worst = min(scores["rows"], key=lambda r: r["si_sdri"])
    assert state["first"] == worst["source"]  # the page opens sorted by SI-SDRi, worst first
    media = {p for p, _ in _Recorder.requests if p.startswith("/media/")}
    page_requests = [(p, code) for p, code in _Recorder.requests if p != "/favicon.ico"]  # the browser's own guess
    assert len(media) == 2 * 3 * 7 and all(code in (200, 206, 304) for _, code in page_requests), page_requests
