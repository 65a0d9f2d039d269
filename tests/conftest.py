"""Shared pytest setup. Keep BLAS single-threaded: on shared cores two BLAS threads made
mir_eval 7x slower here, and the tests compare against it."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
