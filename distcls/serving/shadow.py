"""Mirrored requests: after a request was answered, the same images go to another variant for comparison. No Ray.

Requests the primary answered are mirrored to every shadow; requests an A/B variant answered are mirrored to
the primary (so that a canary is compared on the same images too). A job waits in a bounded queue of its
own per Ingress replica and is sent by a few worker tasks: when the queue is full the mirror is dropped and
counted, so a slow or failing shadow costs the answered requests nothing but an enqueue.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

MIRROR_WORKERS = 4
MIRROR_TIMEOUT_S = 30.0


@dataclass
class MirrorJob:
    variant: str  # the non-primary side of the pair (a shadow, or the A/B variant that answered)
    call: str  # the variant to send the images to (the shadow, or the primary)
    images: list[bytes]
    answered: list[dict]  # the answering side's predictions, in image order
    answered_model: str | None = None


def top1(prediction: dict) -> list:
    return [prediction["label"], float(prediction["score"])]


class Mirror:
    """A bounded queue of MirrorJobs and the workers that send them; `emit(event)` receives the stats events."""

    def __init__(
        self,
        primary: str,
        queue_size: int,
        send: Callable[[str, bytes], Awaitable[dict]],
        emit: Callable[[dict], None],
        timeout_s: float = MIRROR_TIMEOUT_S,
        hash_images: bool = False,
    ):
        self.primary, self.send, self.emit, self.timeout_s = primary, send, emit, timeout_s
        self.hash_images = hash_images  # the rollout log names each image by its sha256
        self.queue: asyncio.Queue[MirrorJob] | None = None
        self.queue_size, self.workers = queue_size, []

    def offer(self, job: MirrorJob) -> bool:
        """Queue a job (never waits); False, with a `drop` event, when the queue is full."""
        if self.queue is None:  # made in the replica's event loop, on first use
            self.queue = asyncio.Queue(maxsize=self.queue_size)
            self.workers = [asyncio.get_running_loop().create_task(self.work()) for _ in range(MIRROR_WORKERS)]
        try:
            self.queue.put_nowait(job)
            return True
        except asyncio.QueueFull:
            self.emit({"e": "drop", "variant": job.variant})
            return False

    async def work(self) -> None:
        while True:
            job = await self.queue.get()
            try:
                await self.run(job)
            except Exception as exc:  # a mirror never takes the worker down
                print(f"distcls: mirror to {job.call}: {type(exc).__name__}: {exc}", flush=True)
            finally:
                self.queue.task_done()

    async def run(self, job: MirrorJob) -> None:
        started = time.perf_counter()
        try:
            results = await asyncio.wait_for(asyncio.gather(*(self.send(job.call, data) for data in job.images)), self.timeout_s)
        except Exception:
            results = None
        ok = results is not None and all("error" not in r for r in results)
        if job.call != self.primary:  # a shadow's own traffic is its mirrors
            self.emit(
                {
                    "e": "req",
                    "variant": job.call,
                    "ok": ok,
                    "ms": (time.perf_counter() - started) * 1000,
                    "labels": [r["label"] for r in results] if ok else [],
                    "scores": [r["score"] for r in results] if ok else [],
                }
            )
        if not ok:
            self.emit({"e": "mirror_error", "variant": job.variant})
            return
        mirrored = [top1(r) for r in results]
        answered = [top1(r) for r in job.answered]
        primary, other = (answered, mirrored) if job.call != self.primary else (mirrored, answered)
        models = (job.answered_model, results[0].get("model", {}).get("id"))
        primary_model, other_model = models if job.call != self.primary else models[::-1]
        self.emit(
            {
                "e": "pair",
                "variant": job.variant,
                "time": time.time(),
                "images": [hashlib.sha256(data).hexdigest() for data in job.images] if self.hash_images else None,
                "primary": primary,
                "other": other,
                "primary_model": primary_model,
                "other_model": other_model,
            }
        )
