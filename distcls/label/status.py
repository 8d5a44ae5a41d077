"""What a labeling job reports: the progress file a running job rewrites (OUTPUT/_progress.json: done, total,
rate, ETA), `_SUCCESS.json` when it ends complete, and `--status`: planned, written, errors by kind, complete,
and the ETA of a job that is running. The counts come from the partitioned index (buckets.py): in this process
for small outputs, in Ray tasks past LOCAL_ROWS keys, so no process holds the whole set.
"""

from __future__ import annotations

import datetime as dt
import json
import resource
import time

from distcls import DistclsError, storage
from distcls.label.buckets import PART_ROWS_GUESS, Index, index_output
from distcls.label.parts import SUCCESS, existing_parts
from distcls.label.plan import StoredPlan, now
from distcls.progress import format_duration

PROGRESS = "_progress.json"
PROGRESS_EVERY_S = 10.0  # how often a running job rewrites _progress.json
LOCAL_ROWS = 200_000  # planned keys + labeled rows past which counting runs in Ray tasks


def write_progress(output: str, snapshot: dict, state: str = "running") -> None:
    """OUTPUT/_progress.json: a Progress snapshot (done counts this output's rows), when, and the state."""
    record = {**snapshot, "state": state, "updated_at": now()}
    storage.write_text(storage.join_uri(output, PROGRESS), json.dumps(record))


def read_progress_file(output: str) -> dict | None:
    uri = storage.join_uri(output, PROGRESS)
    try:
        record = json.loads(storage.read_text(uri)) if storage.exists(uri) else None
    except (ValueError, DistclsError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("updated_at"), str) else None


def running_line(record: dict | None) -> str | None:
    """`--status`'s line on a running job: done/total, rate, ETA, and how old the figures are."""
    if not record or record.get("state") != "running":
        return None
    try:
        age = (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(record["updated_at"])).total_seconds()
        done, total, rate = int(record["done"]), record.get("total"), float(record.get("rate") or 0)
    except (KeyError, TypeError, ValueError):
        return None
    of = f"/{int(total):,}" if isinstance(total, int) else ""
    line = f"{done:,}{of} labeled, {rate:,.1f} images/s, ETA {format_duration(record.get('eta_s'))}"
    if age > 3 * PROGRESS_EVERY_S + 30:
        return f"not running? ({line} {format_duration(age)} ago, its last report)"
    return f"running ({line}; reported {format_duration(age)} ago)"


def remote_needed(plan: StoredPlan, parts: int) -> bool:
    return plan.keys + parts * PART_ROWS_GUESS > LOCAL_ROWS


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss would also count what a parent held before exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def finish(output: str, plan: StoredPlan, index: Index, summary: dict, started: float) -> dict:
    """Counts for the summary; OUTPUT/_SUCCESS.json when every planned object has its row."""
    seconds = time.perf_counter() - started
    summary.update(
        total=plan.keys if plan.complete else index.distinct,
        rows=index.rows,
        distinct=index.distinct,
        seconds=seconds,
        images_per_s=summary["labeled"] / max(seconds, 1e-9),
        driver_peak_rss_mb=peak_rss_mb(),
    )
    summary["skipped_done"] = summary["total"] - summary["labeled"]
    summary["complete"] = plan.complete and index.todo_rows == 0
    if summary["complete"]:
        record = {
            "objects": plan.keys,
            "rows": index.rows,
            "distinct_paths": index.distinct,
            "errors": index.errors,
            "errors_by_kind": index.errors_by_kind,
            "parts": len(index.parts),
            "model": summary["model"],
            "runtime": summary.get("runtime"),
            "scores": summary.get("scores"),
            "unknown_above": summary.get("unknown_above"),
            "finished_at": now(),
            "last_run": {
                k: summary.get(k)
                for k in ("labeled", "seconds", "images_per_s", "plan_seconds", "driver_peak_rss_mb", "duplicates_removed")
            },
        }
        storage.write_text(storage.join_uri(output, SUCCESS), json.dumps(record, indent=1))
    return summary


def read_success(output: str) -> dict | None:
    """OUTPUT/_SUCCESS.json, or None when there is none; one line when it is not a job's record."""
    uri = storage.join_uri(output, SUCCESS)
    if not storage.exists(uri):
        return None
    try:
        record = json.loads(storage.read_text(uri))
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("model"), str | None):
        raise DistclsError(
            f"label --status: {uri} is not the record a finished job writes (a JSON object with its counts); "
            "delete it and run the same `distcls label` again to check the output and write it anew"
        )
    return record


def label_status(output: str, print_it: bool = True) -> dict:
    """`distcls label --status`: objects planned, rows written, errors by kind, complete or not, and the ETA of
    a running job."""
    if not storage.exists(output):
        raise DistclsError(f"label --status: {output} does not exist; check the --output URI")
    plan = StoredPlan.read(output)
    record = read_success(output)
    remote = remote_needed(plan, len(existing_parts(output)))
    if remote:
        from distcls.runtime import init_ray

        init_ray()
    index = index_output(output, plan, None, repair=False, remote=remote)
    planned = plan.keys if plan.listers else None
    complete = bool(plan.complete and record and index.todo_rows == 0)
    running = None if complete else running_line(read_progress_file(output))
    status = {
        "output": output,
        "planned": planned,
        "plan_complete": plan.complete,
        "rows": index.rows,
        "distinct_paths": index.distinct,
        "parts": len(index.parts),
        "errors": index.errors,
        "errors_by_kind": index.errors_by_kind,
        "complete": complete,
        "running": running,
        "model": record["model"] if record else None,
    }
    if print_it:
        print_status(status, plan, index)
    return status


def print_status(status: dict, plan: StoredPlan, index: Index) -> None:
    planned = status["planned"]
    listing = "" if plan.complete or not plan.listers else f" so far ({len(plan.finished)}/{len(plan.listers)} listers done)"
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(status["errors_by_kind"].items())) or "none"
    print(f"output {status['output']}")
    print(f"  planned:  {planned if planned is not None else 'no plan'} objects{listing}")
    print(f"  written:  {status['rows']} rows, {status['distinct_paths']} distinct paths, in {status['parts']} parts")
    print(f"  errors:   {status['errors']} ({kinds})")
    if status["running"]:
        print(f"  job:      {status['running']}")
    todo = index.todo_rows if plan.complete else ((planned - status["distinct_paths"]) if planned is not None else "?")
    print(
        f"  complete: {'yes' if status['complete'] else 'no'}"
        + ("" if status["complete"] else f" ({todo} to do; rerun the same `distcls label` to finish)")
    )
