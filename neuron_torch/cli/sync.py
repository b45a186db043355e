"""``neuron-torch sync``: send what runs kept in their spools while their tracking server did not answer, then
end the runs of this machine whose process is gone (SIGKILL, a crash, a power cut) as KILLED.

Each spool goes to the store it names (``run.json``), in journal order, resuming after the records already
sent, and is removed once everything in it reached the store. Its last record is the run's final status.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Optional

from neuron_torch.errors import first_line
from neuron_torch.cli.console import setup_logging, user_error
from neuron_torch.tracking.reachability import bound_http_retries, is_unreachable, reason, why_silent
from neuron_torch.tracking.spool import (HOST_TAG, KEPT_EXIT, PID_TAG, Spool, SpoolBusy, Tally, deliver, find,
                                         shown_path)
from neuron_torch.tracking.uri import resolve_tracking_uri

ENDED_TAG = "neuron_torch.ended_by"  # on a run that sync marked KILLED: why


def sync(args: Optional[list[str]] = None) -> int:
    """Replay every spool under ``args`` (default ``./checkpoints``) and end orphaned runs; the exit code is
    0 when nothing is left, 75 when a spool still waits for its server."""
    setup_logging()
    parser = argparse.ArgumentParser(
        prog="neuron-torch sync",
        description="Send what runs kept in checkpoints/<run id>/spool while their tracking server did not "
                    "answer, and mark RUNNING runs of this machine whose process is gone as KILLED.")
    parser.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                        help="a spool, a run's checkpoint folder, or a folder to search (default: ./checkpoints)")
    parser.add_argument("--tracking_uri", default=None,
                        help="the store whose RUNNING runs are checked besides those the spools name (default: "
                             "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    try:
        options = parser.parse_args(args)
    except SystemExit as exit_:  # --help, or argparse's own usage error (exit 2)
        return int(exit_.code or 0)
    missing = [path for path in options.paths if not path.exists()]
    if missing:
        return user_error(f"{missing[0]}: no such file or folder")
    bound_http_retries()

    stores: dict[str, None] = {}  # in order, without repeats
    waiting: set[str] = set()  # runs whose spool is still there
    spools = find(options.paths or [Path("checkpoints")])
    for spool in spools:
        try:
            meta = spool.meta
        except (OSError, ValueError) as err:
            print(f"{shown_path(spool.folder)}: not a readable spool ({err}); left as it is")
            continue
        stores[meta["tracking_uri"]] = None
        if not _replay(spool, meta):
            waiting.add(meta["run_id"])
    # the option names the store to check; else the one a run would use
    stores[options.tracking_uri or resolve_tracking_uri(None)] = None
    ended = sum(_end_orphans(uri, waiting) for uri in stores)
    if not spools and not ended:
        print("nothing to send: no spool found under " + ", ".join(map(str, options.paths or ["checkpoints"])))
    return KEPT_EXIT if waiting else 0


def _replay(spool: Spool, meta: dict) -> bool:
    """Send one spool's unsent records in order; True when all of them reached the store (the spool is gone)."""
    from mlflow import MlflowClient

    run_id, uri, where = meta["run_id"], meta["tracking_uri"], shown_path(spool.folder)
    try:
        spool.lock()
    except SpoolBusy:
        print(f"run {run_id}: {where} is still being written by process {meta.get('pid')} on "
              f"{meta.get('host')}; left for later")
        return False
    try:
        silent = why_silent(uri)
        if silent:
            print(f"run {run_id}: tracking server {uri} does not answer ({silent}); {spool.tally()} stay in {where}")
            return False
        client, sent = MlflowClient(uri), Tally()
        for line, record in spool.unsent_batches():
            try:
                deliver(client, run_id, record, spool.folder)
            except Exception as err:
                why = (f"tracking server {uri} stopped answering ({reason(err)})" if is_unreachable(err)
                       else f"the store refused a {record['kind']} record ({first_line(err)})")
                print(f"run {run_id}: {why} after {sent}; the rest stays in {where}")
                return False
            spool.mark_sent(line)
            sent.add(record)
        print(f"run {run_id}: sent {sent}; " + (sent.status or "no final status in the spool"))
        spool.remove()
        return True
    finally:
        spool.unlock()


def _end_orphans(uri: str, waiting: set[str]) -> int:
    """Mark KILLED the RUNNING runs of ``uri`` started on this host by a process that is gone (and whose spool
    is not still waiting). Returns how many."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from neuron_torch.tracking.store import sqlite_path

    db = sqlite_path(uri)
    if db is not None and not db.exists():  # no store there: nothing to check, and none is created
        return 0
    silent = why_silent(uri)
    if silent:
        print(f"tracking server {uri} does not answer ({silent}); its RUNNING runs were not checked")
        return 0
    client, host = MlflowClient(uri), socket.gethostname()
    experiments = [e.experiment_id for e in _pages(client.search_experiments, view_type=ViewType.ALL)]
    if not experiments:
        return 0
    found = _pages(client.search_runs, experiment_ids=experiments, run_view_type=ViewType.ALL,
                   filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'")
    ended = 0
    for run in found:
        pid = run.data.tags.get(PID_TAG, "")
        if run.info.run_id in waiting or not pid.isdigit() or _alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, ENDED_TAG,
                       f"neuron-torch sync: process {pid} on {host} ended without ending the run")
        client.set_terminated(run.info.run_id, "KILLED")
        print(f"run {run.info.run_id}: its process {pid} on {host} is gone; marked KILLED")
        ended += 1
    return ended


def _pages(search, **kwargs) -> list:
    """Every result of an MLflow search, page after page."""
    results, token = [], None
    while True:
        page = search(**kwargs, page_token=token)
        results += list(page)
        token = page.token
        if not token:
            return results


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a zombie, which has ended, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    stat = Path(f"/proc/{pid}/stat")
    if sys.platform.startswith("linux") and stat.exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True
    return True
