"""The server side of hf-sde in vLLM's OpenAI-compatible server: traces in responses and at an endpoint.

:class:`SDETraceMiddleware` is a plain ASGI middleware, loaded with vLLM's own ``--middleware
hf_sde.vllm.middleware.SDETraceMiddleware`` (``python -m hf_sde.vllm.serve`` adds it). For ``/v1/completions``
and ``/v1/chat/completions`` requests whose ``vllm_xargs`` carry ``sde_*`` keys it

- sets ``sde_trace_id`` when the client did not (a fresh ``sde-<hex>``) and returns it in the
  ``x-sde-trace-id`` response header;
- gives a steered request its own ``cache_salt`` unless the client set one, so that prefix caching never hands
  its steered KV cache to another request;
- adds the trace to a non-streaming JSON response as ``"sde_trace"`` (``SDETrace.to_dict()``, shape (1, n), NaN
  as null; with the ``openai`` client: ``completion.sde_trace`` / ``completion.model_extra["sde_trace"]``).

``GET /v1/sde/traces/{trace_id}`` returns a trace (for streaming requests) and forgets it; 404 if unknown.
"""

from __future__ import annotations

import json
import math
import uuid
from urllib.parse import unquote

from .args import has_sde_args

ROUTE = "/v1/sde/traces/"
GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
HEADER = b"x-sde-trace-id"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


async def fetch_trace(app, key: str, pop: bool = True) -> dict | None:
    results = await app.state.engine_client.collective_rpc("hf_sde_traces", args=([key], pop))
    for result in results:
        if result and result.get(key) is not None:
            return _json_safe(result[key])
    return None


async def _send_json(send, status: int, payload: dict, extra_headers: list | None = None) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


def _error(message: str, status: int = 400) -> dict:
    return {"error": {"message": message, "type": "BadRequestError" if status == 400 else "NotFoundError",
                      "param": None, "code": status}}


class SDETraceMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "")
        if method == "GET" and path.startswith(ROUTE):
            key = unquote(path[len(ROUTE):])
            trace = await fetch_trace(scope["app"], key)
            if trace is None:
                return await _send_json(send, 404, _error(f"no SDE trace {key!r} (unknown, already fetched, or "
                                                          "evicted)", 404))
            return await _send_json(send, 200, {"id": key, "sde_trace": trace})
        if method != "POST" or path not in GENERATE_PATHS:
            return await self.app(scope, receive, send)

        chunks = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        trace_id = None
        stream = False
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("vllm_xargs"), dict) and has_sde_args(data["vllm_xargs"]):
            xargs = data["vllm_xargs"]
            prompt = data.get("prompt")
            if isinstance(prompt, list) and len(prompt) > 1 and not all(isinstance(p, int) for p in prompt):
                return await _send_json(send, 400, _error("an SDE request takes one prompt (each prompt gets its "
                                                          "own trace): send one request per prompt"))
            trace_id = xargs.setdefault("sde_trace_id", f"sde-{uuid.uuid4().hex}")
            mode = xargs.get("sde_mode")
            if isinstance(mode, str) and "steer" in mode and not data.get("cache_salt"):
                data["cache_salt"] = f"hf-sde-steer-{uuid.uuid4().hex}"
            stream = bool(data.get("stream"))
            body = json.dumps(data).encode()
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
            scope["headers"].append((b"content-length", str(len(body)).encode()))

        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if trace_id is None or not isinstance(trace_id, str):
            return await self.app(scope, replay, send)
        header = (HEADER, trace_id.encode())
        if stream:
            async def send_with_header(message):
                if message["type"] == "http.response.start":
                    message = dict(message, headers=[*message.get("headers", []), header])
                await send(message)
            return await self.app(scope, replay, send_with_header)

        start: dict | None = None
        parts: list[bytes] = []

        async def capture(message):
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))
            else:
                await send(message)

        await self.app(scope, replay, capture)
        if start is None:
            return
        payload = b"".join(parts)
        status = start["status"]
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        if status == 200:
            try:
                response = json.loads(payload)
            except ValueError:
                response = None
            if isinstance(response, dict):
                response["sde_trace"] = await fetch_trace(scope["app"], trace_id)
                payload = json.dumps(response).encode()
        headers += [(b"content-length", str(len(payload)).encode()), header]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
