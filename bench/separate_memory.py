"""Peak memory of ``marsctl separate`` against file length (issue 16, item 9: flat with length,
< 1 GB for one hour of 44.1 kHz stereo mp3).

For each length it generates a 44.1 kHz stereo mp3 (two tones with a slow tremolo, libmp3lame
128 kb/s), runs ``python -m marsctl separate FILE -q violin --device cpu`` (the packaged default
model) in a fresh process, and reads that process's peak resident set size from ``wait4``
(``ru_maxrss``, which covers the ffmpeg decoder it waits for too). Prints one row per length and
the ratio of the peaks (longest / shortest): about 1 when memory does not grow with length.

    python bench/separate_memory.py                    # 10 and 60 minutes (the issue's pair)
    python bench/separate_memory.py --minutes 2 12     # a quicker pair
    python bench/separate_memory.py --batch-size 2     # a smaller working set of the separator
    PYTHONPATH=/path/to/old/checkout python bench/separate_memory.py --minutes 2 12   # another version
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_mp3(path: Path, minutes: float) -> None:
    seconds = minutes * 60
    expression = "0.3*sin(2*PI*440*t)*(1+sin(2*PI*0.5*t))/2+0.2*sin(2*PI*659.25*t)|0.3*sin(2*PI*440*t)+0.2*sin(2*PI*523.25*t)"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", f"aevalsrc={expression}:s=44100:d={seconds}",
                    "-c:a", "libmp3lame", "-b:a", "128k", str(path)], check=True)


def peak_rss_of_separate(path: Path, out: Path, batch_size: int) -> tuple[float, float, int]:
    """(peak RSS in MiB, wall seconds, exit status) of one ``marsctl separate`` run."""
    command = [sys.executable, "-m", "marsctl", "separate", str(path), "-q", "violin", "--device", "cpu", "-o", str(out), "--overwrite",
               "--batch-size", str(batch_size)]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.stderr.write(process.stderr.read().decode(errors="replace"))
    return usage.ru_maxrss / 1024, wall, process.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[10, 60], help="file lengths to compare")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the generated files here (default: a temporary folder)")
    parser.add_argument("--batch-size", type=int, default=8, help="marsctl separate --batch-size (the model's working set)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.workdir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for minutes in args.minutes:
            mp3 = work / f"tones-{minutes:g}min.mp3"
            if not mp3.exists():
                make_mp3(mp3, minutes)
            peak, wall, status = peak_rss_of_separate(mp3, work / "out", args.batch_size)
            import soundfile as sf

            written = work / "out" / mp3.stem / "violin.wav"
            seconds_out = sf.info(str(written)).duration if status == 0 else 0.0
            rows.append({"minutes": minutes, "batch_size": args.batch_size, "peak_rss_mib": round(peak, 1), "wall_s": round(wall, 1), "exit": status,
                         "output_minutes": round(seconds_out / 60, 3)})
            print(f"{minutes:6g} min mp3: peak RSS {peak:8.1f} MiB, {wall:7.1f} s, exit {status}, output {seconds_out / 60:.2f} min", flush=True)
    if len(rows) > 1:
        print(f"peak ratio {rows[-1]['minutes']:g} min / {rows[0]['minutes']:g} min: {rows[-1]['peak_rss_mib'] / rows[0]['peak_rss_mib']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
