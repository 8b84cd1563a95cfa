"""The OpenAI-compatible HTTP surface (FastAPI): /v1/models, /v1/completions, /v1/chat/completions (JSON or
SSE streaming), /health, /metrics.

`create_app` is a factory over a `Served` (the text side: tokenizer, chat template, detokenizer, stop ids,
generation defaults; and a `TokenEngine`): the same app runs under uvicorn over an in-process `Scheduler`
(`moetrt.serve.server`) or as the ingress of a Ray Serve application whose engine lives in replicas. It is
created before the model is loaded and answers 503 (/health too) until `set_served` hands it one.

Wire format (the OpenAI API reference, as the official `openai` client consumes it): a streamed answer is
`data: {chunk}` server-sent events; a chat stream's first delta carries the role and its last chunk the
finish_reason; `stream_options.include_usage` adds a chunk with `choices: []` and the usage; then
`data: [DONE]`. Text is produced per token by the detokenizer (no UTF-8 character is ever split) and passed
through the stop-string matcher (a stop string is never released, even when it arrives over several
tokens); the streamed pieces and the non-streamed answer come from the same pipeline, so a stream's text
equals the answer's. Errors are OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`): 400 for a
bad request (naming the field), 401 for a wrong API key, 404 for an unknown model, 429 when the queue is
full, 503 while loading or shutting down; bad input never produces a 500.

A client that disconnects cancels its request: a stream is cancelled by Starlette when the connection
closes (the response task gets CancelledError at its next await), a non-streamed request by a task that
waits for the ASGI `http.disconnect` message; either way the engine frees the slot before its next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moetrt.errors import MoetrtError
from moetrt.runtime.sampling import SamplingParams
from moetrt.runtime.stops import StopMatcher
from moetrt.serve.engine import EngineUnavailable, GenerationRequest, QueueFull, TokenEngine, TokenStream
from moetrt.serve.metrics import Metrics
from moetrt.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


class Detokenizer(Protocol):
    def push(self, token_id: int) -> str: ...


class GenerationDefaults(Protocol):
    max_new_tokens: int | None

    def sampling(
        self, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None
    ) -> SamplingParams: ...


class TextSide(Protocol):
    """What the app needs of the text model (a `TextModel` is one)."""

    stop_token_ids: frozenset[int]
    generation: GenerationDefaults

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def detokenizer(self, prompt_ids: list[int]) -> Detokenizer: ...


@dataclass
class Served:
    """A model being served: its API name, its text side and the engine that generates its tokens."""

    name: str
    text: TextSide
    engine: TokenEngine


class OpenAIError(Exception):
    """An error answered as OpenAI's JSON body with `status`."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def create_app(served: Served | None = None, api_key: str | None = None, metrics: Metrics | None = None) -> FastAPI:
    """The OpenAI app over `served` (None: answer 503 until `set_served`). With `api_key`, /v1 routes need
    `Authorization: Bearer <api_key>`; /health and /metrics stay open, as in vLLM."""
    app = FastAPI(title="moetrt", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served
    app.state.metrics = metrics = metrics or Metrics()
    app.add_middleware(CountRequests, metrics=metrics)

    def ready(request: Request, model: str | None = None) -> Served:
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
        current: Served | None = app.state.served
        if current is None:
            raise OpenAIError(503, "the model is loading; retry shortly", kind="service_unavailable")
        if model is not None and model != current.name:
            raise OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return current

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, err: OpenAIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return validation_error(err).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> JSONResponse:
        return OpenAIError(err.status_code, str(err.detail)).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception) -> JSONResponse:
        return OpenAIError(500, f"internal error: {type(err).__name__}").response()

    @app.get("/health")
    async def health() -> JSONResponse:
        if app.state.served is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card(ready(request).name)]})

    @app.get("/v1/models/{model}")
    async def model(request: Request, model: str) -> JSONResponse:
        return JSONResponse(model_card(ready(request, model).name))

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        current = ready(request, body.model)
        try:
            prompt_ids = current.text.encode(body.prompt) if isinstance(body.prompt, str) else body.prompt
        except MoetrtError as err:
            raise OpenAIError(400, str(err), param="prompt") from None
        check_token_ids(prompt_ids, current.engine.vocab_size)
        spec = plan(current, body, prompt_ids, body.max_tokens, "prompt")
        return await answer(request, current, spec, body, CompletionFormat(current.name))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        current = ready(request, body.model)
        try:
            prompt_ids = current.text.encode_chat(body.chat())
        except MoetrtError as err:
            raise OpenAIError(400, str(err), param="messages") from None
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        spec = plan(current, body, prompt_ids, body.max_new_tokens, "messages", field)
        return await answer(request, current, spec, body, ChatFormat(current.name))

    return app


def set_served(app: FastAPI, served: Served | None) -> None:
    """Start (or, with None, stop) answering for `served`: /health turns 200 and /v1 routes serve it."""
    app.state.served = served


def model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "moetrt"}


# --- requests -> engine ------------------------------------------------------------------------------------
def check_token_ids(ids: list[int], vocab_size: int) -> None:
    if not ids:
        raise OpenAIError(400, "prompt: no tokens to start from", "prompt")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise OpenAIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "prompt")


def plan(
    served: Served,
    body: SamplingFields,
    prompt_ids: list[int],
    max_tokens: int | None,
    prompt_field: str,
    max_tokens_field: str = "max_tokens",
) -> GenerationRequest:
    """The engine request for a checked body: the prompt must leave room in the context; max_tokens defaults
    to the rest of the context (capped by the checkpoint's max_new_tokens); sampling fields not given take
    the checkpoint's generation defaults; no seed: a random one."""
    limit = served.engine.max_seq_len
    room = limit - len(prompt_ids)
    if room < 1:
        raise OpenAIError(
            400, f"{prompt_field}: the prompt is {len(prompt_ids)} tokens; this model's maximum context length is "
            f"{limit} tokens, which leaves no room to generate", prompt_field, "context_length_exceeded",
        )  # fmt: skip
    if max_tokens is None:
        max_tokens = min(room, served.text.generation.max_new_tokens or room)
    elif max_tokens > room:
        raise OpenAIError(
            400, f"{max_tokens_field}: the prompt ({len(prompt_ids)} tokens) plus {max_tokens_field} ({max_tokens}) "
            f"exceeds this model's maximum context length of {limit} tokens", max_tokens_field,
            "context_length_exceeded",
        )  # fmt: skip
    top_k = None if body.top_k is None else max(body.top_k, 0)
    try:
        sampling = served.text.generation.sampling(temperature=body.temperature, top_k=top_k, top_p=body.top_p)
    except MoetrtError as err:
        raise OpenAIError(400, str(err)) from None
    return GenerationRequest(
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        sampling=sampling,
        seed=secrets.randbits(64) if body.seed is None else body.seed % 2**64,
        stop_token_ids=frozenset() if body.ignore_eos else frozenset(served.text.stop_token_ids),
    )


async def submit(engine: TokenEngine, spec: GenerationRequest) -> TokenStream:
    try:
        return await engine.submit(spec)
    except QueueFull as err:
        message = f"the server is busy: {err}; retry later"
        raise OpenAIError(429, message, code="queue_full", kind="rate_limit_error") from None
    except EngineUnavailable as err:
        raise OpenAIError(503, str(err), kind="service_unavailable") from None


# --- engine -> text ----------------------------------------------------------------------------------------
class TextRun:
    """One request's token deltas as text pieces: detokenized, stop strings applied, usage counted.

    Iterating yields (text, finish_reason) pairs, finish_reason None until the last; a stop string ends the
    run with "stop" and cancels the engine request (its slot frees before the next step). The text is what
    `moetrt generate` prints for the same tokens: the detokenizer's pieces, cut before the first stop string."""

    def __init__(self, stream: TokenStream, spec: GenerationRequest, text: TextSide, stops: StopMatcher):
        self.stream = stream
        self.prompt_tokens = len(spec.prompt_ids)
        self.completion_tokens = 0
        self._stop_ids = spec.stop_token_ids
        self._detokenizer = text.detokenizer(spec.prompt_ids)
        self._stops = stops

    @property
    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}

    async def __aiter__(self) -> AsyncIterator[tuple[str, str | None]]:
        async for delta in self.stream:
            parts = []
            for token in delta.token_ids:
                self.completion_tokens += 1
                if delta.finish_reason == "stop" and token in self._stop_ids:
                    break  # the stop token ends the answer and has no text
                parts.append(self._stops.push(self._detokenizer.push(token)))
                if self._stops.matched is not None:
                    self.stream.cancel()
                    yield "".join(parts), "stop"
                    return
            if delta.finish_reason in ("cancelled", "error"):
                raise OpenAIError(503, f"the engine ended the request ({delta.finish_reason})", kind="server_error")
            if delta.finish_reason is not None:
                parts.append(self._stops.flush())
            yield "".join(parts), delta.finish_reason


class CompletionFormat:
    """/v1/completions objects ("text_completion")."""

    def __init__(self, model: str):
        self.id, self.model, self.created = f"cmpl-{uuid.uuid4().hex}", model, int(time.time())

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}

    def first(self) -> dict[str, Any] | None:
        return None

    def chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {**self.head(), "choices": [choice]}

    def answer(self, text: str, finish_reason: str | None, usage: dict[str, int]) -> dict[str, Any]:
        return {**self.chunk(text, finish_reason), "usage": usage}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self.head(), "choices": [], "usage": usage}


class ChatFormat(CompletionFormat):
    """/v1/chat/completions objects ("chat.completion", "chat.completion.chunk")."""

    def __init__(self, model: str):
        super().__init__(model)
        self.id = f"chatcmpl-{uuid.uuid4().hex}"

    def head(self, chunk: bool = True) -> dict[str, Any]:
        kind = "chat.completion.chunk" if chunk else "chat.completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def first(self) -> dict[str, Any]:
        return self._delta({"role": "assistant", "content": ""}, None)

    def chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return self._delta({"content": text} if text else {}, finish_reason)

    def answer(self, text: str, finish_reason: str | None, usage: dict[str, int]) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}
        return {**self.head(chunk=False), "choices": [choice], "usage": usage}

    def _delta(self, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**self.head(), "choices": [choice]}


async def answer(
    request: Request, served: Served, spec: GenerationRequest, body: SamplingFields, fmt: CompletionFormat
) -> Response:
    stops = StopMatcher(body.stop_strings)
    stream = await submit(served.engine, spec)
    try:
        run = TextRun(stream, spec, served.text, stops)
    except BaseException:
        stream.cancel()
        raise
    if body.stream:
        return StreamingResponse(
            events(run, fmt, body.include_usage), media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
            background=BackgroundTask(stream.cancel),  # runs even when the client left before the body started
        )  # fmt: skip
    collect = asyncio.ensure_future(collect_text(run))
    gone = asyncio.ensure_future(disconnected(request.receive))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():
            collect.cancel()
        stream.cancel()
    if not collect.done() or collect.cancelled():
        return Response(status_code=499)  # the client went away; nobody reads this
    text, finish_reason = collect.result()
    return JSONResponse(fmt.answer(text, finish_reason, run.usage))


async def collect_text(run: TextRun) -> tuple[str, str | None]:
    parts, reason = [], None
    async for text, finish_reason in run:
        parts.append(text)
        reason = finish_reason
    return "".join(parts), reason


async def disconnected(receive: Receive) -> None:
    """Return when the client closes the connection (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def events(run: TextRun, fmt: CompletionFormat, include_usage: bool) -> AsyncIterator[str]:
    """The SSE body; cancelled by Starlette when the client disconnects, which cancels the engine request."""
    try:
        first = fmt.first()
        if first is not None:
            yield sse(first)
        async for text, finish_reason in run:  # one event per delta, even with no text: clients can time tokens
            chunk = fmt.chunk(text, finish_reason)
            yield sse({**chunk, "usage": None} if include_usage else chunk)
        if include_usage:
            yield sse(fmt.usage_chunk(run.usage))
    except OpenAIError as err:
        yield sse(err.body())
    finally:
        run.stream.cancel()
    yield "data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# --- errors and metrics ------------------------------------------------------------------------------------
def validation_error(err: RequestValidationError) -> OpenAIError:
    """The first pydantic error as a 400 naming its field: `messages[0].role`, `max_tokens`, ..."""
    first = err.errors()[0]
    loc = list(first.get("loc", ()))[1:]  # loc[0] is "body"
    if first.get("type") == "json_invalid":
        return OpenAIError(400, "the request body is not valid JSON")
    if not loc or not isinstance(loc[0], str):
        return OpenAIError(400, "the request body must be a JSON object with the fields of the OpenAI API")
    param = loc[0]
    for index, name in zip(loc[1::2], loc[2::2], strict=False):  # list index, then the field inside: messages[0].role
        if not (isinstance(index, int) and isinstance(name, str)):
            break
        param += f"[{index}].{name}"
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return OpenAIError(400, f"{param}: {message}", param)


class CountRequests:
    """ASGI middleware counting responses by endpoint and status (pure ASGI: a BaseHTTPMiddleware would wrap
    `receive` and hide client disconnects from streaming responses)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
