"""The routes of an endpoint that serves many models (`--models PREFIX`), a mixin of the `Ingress`.

GET /v1/models lists the checkpoints under the prefix (listed again on every call) and the answering classifier
replica's loaded models; POST /v1/models/{id}/classify is /v1/classify for one of them. A request names its model
by that path, by /v2/models/{id}/infer or by Ray Serve's `serve_multiplexed_model_id` header (`model_for`); an id
that is not under the prefix, even after listing it again, is a JSON 404.
"""

from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve

from distcls.serving.catalog import ID_HEADER
from distcls.serving.http import RequestError


class ModelRoutes:
    """/v1/models and /v1/models/{id}/classify; `model_for` is the model a request names (every protocol's)."""

    async def model_for(self, request: Request, model_id: str | None = None) -> str | None:
        """The model a request names (its path's id, else the serve_multiplexed_model_id header), checked against the
        prefix; None on a one-model endpoint (the header is ignored there, as Ray Serve does)."""
        if self.catalog is None:
            if model_id is not None:
                raise RequestError(404, "not_found", "this endpoint serves one model (--checkpoint); POST /v1/classify")
            return None
        model_id = model_id or serve.get_multiplexed_model_id() or request.headers.get(ID_HEADER)
        if not model_id:
            raise RequestError(
                400,
                "model_required",
                "this endpoint serves many models: name one with POST /v1/models/{id}/classify, /v2/models/{id}/infer "
                f"or the {ID_HEADER} header; GET /v1/models lists them",
            )
        return await self.catalog.require(model_id)

    async def list_models(self, request: Request):
        """The models this endpoint serves, and the loaded models and evictions of the replica that answered."""
        try:
            self.authorize(request)
            if self.catalog is None:
                info = await self.call_classifier("info")
                return JSONResponse({"models": [{"id": self.model_name, "model_id": info["id"]}], "multiplexed": False})
            ids = await self.catalog.refresh()
            replica = await self.call_classifier("models_status")
        except RequestError as err:
            return self.refuse(err)
        return JSONResponse({"models": [{"id": i} for i in ids], "multiplexed": True, "replica": replica})
