"""The version router: the HTTP ingress of an app that serves several versions of a model.

Only an app with ``versions`` has one (``raylm.serve.builder``); a one-version app keeps
its model replica as the ingress, so its tokens cross no extra process. The router
reads the request body, picks a version by weight (``raylm.serve.versions``), and hands
the raw request to that version's deployment through a Serve handle (``raylm_forward``),
where raylm's request checks, the engine guard and vLLM's app run exactly as they do for
a one-version app. The answer's ASGI messages come back as they are produced (streams
stay streams) with ``x-raylm-version`` added. Weights are the ``user_config``: a promote
or rollback reconfigures the router in place while its requests continue.

With ``lora.affinity`` (also for one version) a request for an adapter is sent with
Serve's ``multiplexed_model_id``: each replica loads adapters through ray.serve.llm's
``serve.multiplexed`` loader, which reports what it holds, and Serve's router prefers a
replica holding the requested one (else the one holding fewest).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from raylm.serve import engine_health as eh
from raylm.serve.versions import ROUTER, VERSION_HEADER, WeightedPicker, check_weights

logger = logging.getLogger("ray.serve")


class Forwarded(Response):
    """A version's answer, sent on as its deployment produces it."""

    def __init__(self, stream: Any, version: str, responses: bool) -> None:
        self.stream, self.version, self.responses = stream, version.encode(), responses

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = False
        try:
            async for message in self.stream:
                if message["type"] == "http.response.start":
                    headers = [*message.get("headers", []), (VERSION_HEADER, self.version)]
                    message = {**message, "headers": headers}
                    started = True
                await send(message)
        except Exception as err:  # the version's replica itself went away
            logger.warning("version %s failed a request: %s", self.version.decode(), err)
            if not started:
                await eh.unavailable(send)
            else:
                body = eh.error_event(self.responses)
                await send({"type": "http.response.body", "body": body, "more_body": False})


@serve.deployment(name=ROUTER, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
class VersionRouter:
    """Splits one public model name's requests between its versions."""

    def __init__(
        self, models: dict[str, DeploymentHandle], weights: dict[str, float], affinity: bool
    ) -> None:
        self.affinity = affinity
        self.handles = {
            name: handle.options(stream=True, method_name="raylm_forward")
            for name, handle in models.items()
        }
        self.reconfigure({"weights": weights})
        from ray.serve.metrics import Counter

        self.requests = Counter(
            "raylm_version_requests",
            description="Requests the version router sent to each version of the model.",
            tag_keys=("version",),
        )

    def reconfigure(self, config: dict[str, Any]) -> None:
        """A new split (``raylm serve promote`` / ``rollback``); later requests use it."""
        weights = {n: float(w) for n, w in config["weights"].items()}
        check_weights(weights, list(self.handles), "weights")
        self.picker = WeightedPicker(weights)
        logger.info("traffic split: %s", weights)

    async def __call__(self, request: Request) -> Response:
        version = self.picker.pick()
        self.requests.inc(tags={"version": version})
        raw = await request.body()
        fields = eh.scope_fields(request.scope)
        handle = self.handles[version]
        adapter = requested_adapter(raw) if self.affinity else None
        if adapter:  # Serve prefers a replica whose multiplexed models include it
            handle = handle.options(multiplexed_model_id=adapter)
        stream = handle.remote(fields, raw)
        return Forwarded(stream, version, request.url.path.rstrip("/").endswith("responses"))


def requested_adapter(raw: bytes) -> str | None:
    """The ``BASE:ADAPTER`` a request body asks for, or None (the base model, or a body
    the replica's checks will refuse with the reason)."""
    if b":" not in raw:
        return None
    try:
        model = json.loads(raw).get("model")
    except (ValueError, AttributeError):
        return None
    return model if isinstance(model, str) and ":" in model else None


def build_router(models: dict[str, Any], weights: dict[str, float], affinity: bool) -> Any:
    """The app: the router bound to each version's model deployment."""
    return VersionRouter.bind(models, weights, affinity)
