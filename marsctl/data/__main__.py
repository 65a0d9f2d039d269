"""``python -m marsctl.data ARGS`` is ``marsctl data ARGS``.

A tiny runner: it hands the arguments to the top-level entry point (``python -m marsctl``)
instead of importing the CLI, so no module of the data package imports upward.
"""

import runpy
import sys

if __name__ == "__main__":
    sys.argv = ["marsctl", "data", *sys.argv[1:]]
    runpy.run_module("marsctl", run_name="__main__", alter_sys=True)
