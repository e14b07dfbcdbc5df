"""Imported by each local dask worker process as it starts (a dask ``preload``).

Ctrl-C in a terminal (or SIGINT to a background job's process group) reaches every
process of the build. The workers ignore it: the main process alone handles it, by
shutting the cluster down and exiting 130, so the user sees one line instead of a
traceback from every worker.
"""
import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
