"""The `RolloutRecorder` deployment: one replica that every Ingress replica sends its rollout events to, so that
GET /v1/rollout counts the whole endpoint's traffic; with --rollout-log it appends the mirrored pairs to Parquet.

Each pair event becomes one row per image (time, variant, the image's sha256, both labels and scores, both
model ids); rows are written as a new `part-*.parquet` file under the log URI every LOG_ROWS rows and every
LOG_SECONDS seconds (and when the replica stops), never rewriting one.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from ray import serve

from distcls.serving.stats import RolloutStats

LOG_ROWS = 1000
LOG_SECONDS = 5.0


def pair_rows(event: dict) -> list[dict]:
    """A pair event -> one log row per image."""
    base = {
        "time": float(event.get("time", time.time())),
        "variant": event["variant"],
        "primary_model": event.get("primary_model"),
        "variant_model": event.get("other_model"),
    }
    digests = event.get("images") or [None] * len(event["primary"])
    return [
        {
            **base,
            "image_sha256": digest,
            "primary_label": p[0],
            "primary_score": float(p[1]),
            "variant_label": o[0],
            "variant_score": float(o[1]),
            "agree": p[0] == o[0],
        }
        for digest, p, o in zip(digests, event["primary"], event["other"])
    ]


def write_part(uri: str, rows: list[dict]) -> str:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from distcls import storage

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    part = storage.join_uri(uri, f"part-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet")
    storage.write_bytes(part, buf.getvalue())
    return part


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class RolloutRecorder:
    """Folds every Ingress replica's events into one RolloutStats; writes the rollout log."""

    def __init__(self, primary: str, roles: dict[str, str], log_uri: str | None = None):
        self.stats = RolloutStats(primary, roles)
        self.log_uri, self.rows, self.last_write = log_uri, [], time.monotonic()
        self.writing, self.ticker = asyncio.Lock(), None

    async def record(self, events: list[dict]) -> None:
        self.stats.add(events)
        if self.log_uri:
            self.rows += [row for e in events if e.get("e") == "pair" for row in pair_rows(e)]
            if self.ticker is None:
                self.ticker = asyncio.get_running_loop().create_task(self.tick())
            if len(self.rows) >= LOG_ROWS:
                await self.flush()

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(LOG_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        """Write the buffered rows as one new Parquet file (a storage failure is printed; the rows are kept)."""
        async with self.writing:
            rows, self.rows, self.last_write = self.rows, [], time.monotonic()
            if not rows:
                return
            try:
                await asyncio.to_thread(write_part, self.log_uri, rows)
            except Exception as exc:  # the comparison goes on; the next write tries again with these rows
                print(f"distcls: rollout log {self.log_uri}: {exc}", flush=True)
                self.rows = rows + self.rows

    def snapshot(self, weights: dict | None = None) -> dict:
        return self.stats.snapshot(weights)

    async def __del__(self):
        if self.log_uri:
            await self.flush()
