"""The models of a `--models` endpoint: every checkpoint folder directly under one prefix, by folder name. No Ray.

`list_models` lists the prefix (a folder is a model when it holds distcls.json); `Catalog` keeps the latest
listing in an Ingress replica and lists the prefix again for GET /v1/models and for an id it does not know, so
that a checkpoint copied under the prefix is served without a restart. An id is a folder name, never a path.
"""

from __future__ import annotations

import asyncio
import re

from distcls.serving.http import RequestError

MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ID_HEADER = "serve_multiplexed_model_id"  # Ray Serve's own header for a multiplexed model id


def list_models(prefix: str) -> list[str]:
    """The ids (folder names) of the checkpoints directly under `prefix`, sorted."""
    from distcls import storage
    from distcls.checkpoint import META

    root = prefix.rstrip("/") + "/"
    ids = set()
    for uri in storage.list_files(prefix):
        rest = uri[len(root) :] if uri.startswith(root) else ""
        model, _, name = rest.partition("/")
        if name == META and MODEL_ID.match(model):
            ids.add(model)
    return sorted(ids)


def model_uri(prefix: str, model_id: str) -> str:
    return prefix.rstrip("/") + "/" + model_id


def check_model_id(model_id: str) -> str:
    if not MODEL_ID.match(model_id):
        raise RequestError(
            400,
            "bad_request",
            f"model id {model_id[:64]!r} is not a model name (1-128 of A-Za-z0-9._-); GET /v1/models lists them",
        )
    return model_id


class Catalog:
    """The model ids under a prefix, listed again on demand (never more than one listing at a time)."""

    def __init__(self, prefix: str):
        self.prefix, self.ids, self.lock = prefix, (), asyncio.Lock()

    async def refresh(self) -> tuple[str, ...]:
        async with self.lock:
            self.ids = tuple(await asyncio.to_thread(list_models, self.prefix))
        return self.ids

    async def require(self, model_id: str) -> str:
        """`model_id` if a checkpoint of that name is under the prefix (listed again when not known), else 404."""
        check_model_id(model_id)
        if model_id not in self.ids and model_id not in await self.refresh():
            shown = ", ".join(self.ids[:20]) + (" ..." if len(self.ids) > 20 else "")
            raise RequestError(
                404, "model_not_found", f"no model {model_id!r} on this endpoint; the models are: {shown or '(none)'}"
            )
        return model_id
