"""Imported by each local dask worker process as it starts (a dask ``preload``).

Ctrl-C in a terminal (or SIGINT to a background job's process group) reaches every
process of the build. The workers ignore it: the main process alone handles it, by
shutting the cluster down and exiting 130, so the user sees one line instead of a
traceback from every worker.

A worker whose heartbeat is in flight when the build closes the scheduler logs
"Failed to communicate with scheduler during heartbeat" with a traceback; the build
has finished by then (or dask retries the heartbeat), so that record is dropped.
"""
import logging
import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)


class _DropHeartbeatNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to communicate with scheduler during heartbeat")


logging.getLogger("distributed.worker").addFilter(_DropHeartbeatNoise())
