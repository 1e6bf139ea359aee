"""`python -m cluster.serve`: the Pixel Reasoner behind an OpenAI-compatible HTTP API on Ray Serve.

    python -m cluster.serve [--model PATH] [--host 127.0.0.1] [--port 8000] [--config serve.yaml]
                            [key.path=value ...]
    serve run cluster/launch/serve.yaml          # the same app from a Serve config file
    serve deploy cluster/launch/serve.yaml       # onto a running cluster (needs its dashboard)

Endpoints: `POST /v1/chat/completions` (OpenAI format; the request fields and the `pixelray_trace`
of each choice are described in `cluster.serve_api`), `GET /v1/models`, `GET /health`, and a web
page at `GET /` (cluster/serve_static/index.html) with sample images at `GET /samples`.

Two deployments:
- `PixelRayIngress` (FastAPI; light, no model): authentication, the body size cap, request
  validation and image decoding with its limits. Nothing malformed gets past it, so the engine
  replicas never see hostile input, and `/health` answers while the engines are busy.
- `PixelReasoner` (autoscaled between `autoscaling.min_replicas` and `max_replicas`): a vLLM engine
  (`actors.rollout.VLLMEngine`) and a CPU tool pool (`actors.tools.ToolPool`), driven by the SAME
  multi-turn loop as training and evaluation (`policies.episode.start_episodes` / `run_episodes`).

Batching (`_Batcher`): the requests waiting in an engine replica when its engine becomes free (up to
`batching.max_batch_size`; an idle engine first waits `batching.wait_s` for company) run as ONE call
of the loop, so every turn of every request in the batch is one batched `LLM.generate` call (vLLM
schedules them together) and the tool calls of a turn fan out over the tool pool together. One
batch runs at a time per replica (the engine and the pool are not thread-safe), in a worker thread,
so the replica keeps accepting and queueing requests meanwhile. A request that arrives during a
batch waits for the next one (turn-level batching; continuous batching, where requests join a
running batch between decoding steps, would need vLLM's AsyncLLM).
Per-request settings that the loop takes per call are honoured inside one batch: the engine call
of a turn is split by (temperature, top_p); the token budget, the deadline and a forced first turn
are applied per episode by `_TurnDriver`. Requests with different `pixelray_max_turns` run as
consecutive loop calls within the batch.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.serve_api import (
    ApiError,
    ServeAppConfig,
    authorize,
    check_key_policy,
    decode_data_url,
    decode_image,
    error_body,
    fetch_remote_image,
    image_url_kind,
    operation_trace,
    parse_chat_request,
)

logger = logging.getLogger(__name__)

APP_NAME = "pixelray"
STATIC_DIR = Path(__file__).parent / "serve_static"
SAMPLE_SEEDS = (3, 11, 29)  # the built-in synthetic zoom samples of the web page


# ------------------------------------------------------------------------------------------------
# The engine deployment
# ------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One validated request, as the ingress hands it to an engine replica."""

    request_id: str
    question: str
    image: list  # [ObjectRef of the HxWx3 uint8 original] (wrapped: Ray passes the reference)
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    max_turns: int
    seed: int | None
    timeout_s: float
    return_crops: bool
    forced_call: str | None
    received: float = 0.0  # monotonic clock of the replica, set on arrival


@dataclass
class _Control:
    """Per-episode limits the loop's batch-wide settings cannot express."""

    deadline: float
    max_tokens: int
    temperature: float
    top_p: float
    forced: Any = None  # a GenerationResult replacing the first turn
    turns: list[dict] = field(default_factory=list)
    generated: int = 0  # tokens the model generated (a forced turn's are not counted against max_tokens)


class _TurnDriver:
    """The `generate` callable given to `run_episodes`: applies each episode's own deadline, token
    budget, sampling and forced first turn, and records every turn's text for the trace.

    `run_episodes` asks for one turn of every episode that is not done, in episode order (episodes
    out of room are finished before it calls); the driver checks that correspondence on every call.
    An episode past its deadline or budget gets an empty turn with finish reason "timeout" /
    "length" (no engine call), which the loop turns into the end of that episode.
    """

    def __init__(self, engine, episodes: list, controls: list[_Control]):
        from policies.episode import GenerationResult

        self._result = GenerationResult
        self.engine = engine
        self.episodes = episodes
        self.controls = {id(episode): control for episode, control in zip(episodes, controls, strict=True)}
        self.engine_calls = 0

    def __call__(self, requests: list) -> list:
        active = [episode for episode in self.episodes if not episode.done]
        if len(active) != len(requests) or any(
                len(request.token_ids) != len(episode.trajectory.token_ids) for request, episode in zip(requests, active)):
            raise RuntimeError("run_episodes no longer asks for one turn per unfinished episode in order; "
                               "cluster.serve._TurnDriver must follow it")
        results: list = [None] * len(requests)
        groups: dict[tuple[float, float], list[int]] = defaultdict(list)
        now = time.monotonic()
        for index, (request, episode) in enumerate(zip(requests, active)):
            control = self.controls[id(episode)]
            remaining = control.max_tokens - control.generated
            if now >= control.deadline:
                results[index] = self._result([], [], "", False, "timeout")
            elif remaining <= 0:
                results[index] = self._result([], [], "", False, "length")
            elif control.forced is not None and not control.turns:
                results[index] = control.forced
            else:
                request.max_tokens = min(request.max_tokens, remaining)
                groups[(control.temperature, control.top_p)].append(index)
        for (temperature, top_p), indices in groups.items():
            self.engine_calls += 1
            outputs = self.engine.generate([requests[i] for i in indices], temperature, top_p)
            for index, output in zip(indices, outputs, strict=True):
                results[index] = output
        for index, (result, episode) in enumerate(zip(results, active)):
            control = self.controls[id(episode)]
            forced = result is control.forced
            control.generated += 0 if forced else len(result.token_ids)
            control.turns.append({
                "index": len(control.turns), "text": result.text + ("</tool_call>" if result.stopped_at_tool_call else ""),
                "finish_reason": result.finish_reason, "tokens": len(result.token_ids),
                "forced": forced,
            })
        return results


def _prompt_length(episode) -> int:
    """Tokens before the first generated one (the prompt, one pad per image)."""
    mask = episode.trajectory.loss_mask
    return mask.index(1) if 1 in mask else len(mask)


class _Batcher:
    """Dynamic batching for one engine: whatever waits when the engine becomes free is the next batch
    (up to `max_batch_size`); a request reaching an idle engine waits `wait_s` for company first.
    The batch runs in a worker thread, so the replica's event loop keeps queueing requests meanwhile.

    Not `@serve.batch`: it forms each batch when its requests ARRIVE (within its wait) and queues the
    formed batches behind its concurrency limit, so under load a busy engine works through many small
    batches (measured here: a mean batch of 2.3 requests with 16 clients, 2.5 s of the 3.3 s latency
    spent queued in the replica)."""

    def __init__(self, run_batch, max_batch_size: int, wait_s: float):
        self.run_batch, self.max_batch_size, self.wait_s = run_batch, max_batch_size, wait_s
        self._pending: list[tuple[Job, asyncio.Future]] = []
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, job: Job) -> dict:
        loop = asyncio.get_running_loop()
        if self._task is None:  # created on the replica's own event loop
            self._arrived = asyncio.Event()
            self._task = loop.create_task(self._serve())
        future = loop.create_future()
        self._pending.append((job, future))
        self._arrived.set()
        return await future

    async def _serve(self) -> None:
        while True:
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
                if self.wait_s:
                    await asyncio.sleep(self.wait_s)
            batch = [(job, future) for job, future in self._pending[:self.max_batch_size] if not future.done()]
            del self._pending[:self.max_batch_size]
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self.run_batch, [job for job, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
                logger.exception("a batch failed")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


@serve.deployment(name="PixelReasoner")
class PixelReasoner:
    """A vLLM engine and a tool pool, running batches of requests through the training loop."""

    def __init__(self, config: dict, model_path: str):
        from actors.rollout import VLLMEngine
        from actors.tools import ToolPool

        started = time.perf_counter()
        self.config = ServeAppConfig.model_validate(config)
        rollout = self.config.rollout
        max_images = 1 + rollout.max_tool_calls * 8  # a select_frames call returns up to 8 frames
        self.engine = VLLMEngine(model_path, rollout, self.config.dtype, self.config.seed, max_images)
        self.tools = ToolPool(self.config.tools)
        self.batcher = _Batcher(self._run_batch, self.config.batching.max_batch_size, self.config.batching.wait_s)
        self.counters = {"batches": 0, "requests": 0, "max_batch_size": 0, "engine_calls": 0}
        self.startup_s = time.perf_counter() - started

    def ready(self) -> dict:
        return {"startup_s": self.startup_s, **self.counters, "tools": self.tools.stats()}

    async def complete(self, job: Job) -> dict:
        job.received = time.monotonic()
        return await self.batcher.submit(job)

    def _settings(self, max_turns: int):
        from policies.episode import EpisodeSettings

        rollout = self.config.rollout
        return EpisodeSettings(max_tool_calls=max_turns, max_new_tokens_per_turn=rollout.max_new_tokens_per_turn,
                               max_model_len=rollout.max_model_len, budgets=self.config.tools.budgets)

    def _run_batch(self, jobs: list[Job]) -> list[dict]:
        from PIL import Image

        from actors.tools import ToolRequest
        from policies.episode import GenerationResult, run_episodes, start_episodes

        batch_started = time.monotonic()
        tokenizer = self.engine.tokenizer
        results: list[dict | None] = [None] * len(jobs)
        prepared: dict[int, list[tuple[int, list, list[_Control], Any]]] = defaultdict(list)  # max_turns -> ...
        for position, job in enumerate(jobs):
            try:
                original = Image.fromarray(ray.get(job.image[0]))
                episodes = start_episodes(tokenizer, job.request_id, job.question, original, (), job.n,
                                          self._settings(job.max_turns), 0, tool_source=job.image[0], seed=job.seed)
            except Exception as exc:  # noqa: BLE001 - e.g. an image the processor cannot resize
                results[position] = {"error": {"status": 400, "message": f"the image cannot be used ({exc})"[:300]}}
                continue
            forced = None
            if job.forced_call is not None:
                ids = tokenizer.encode(job.forced_call, add_special_tokens=False)
                ids.append(tokenizer.convert_tokens_to_ids("</tool_call>"))
                forced = GenerationResult(ids, [0.0] * len(ids), job.forced_call, True, "tool_call")
            controls = [_Control(job.received + job.timeout_s, job.max_tokens, job.temperature, job.top_p, forced)
                        for _ in episodes]
            prepared[job.max_turns].append((position, episodes, controls, original.size))

        def run_tools(requests):
            return self.tools.run([ToolRequest(turn_text=text, sources=sources) for text, sources in requests])

        engine_calls = 0
        for max_turns, group in prepared.items():
            episodes = [episode for _, job_episodes, _, _ in group for episode in job_episodes]
            controls = [control for _, _, job_controls, _ in group for control in job_controls]
            driver = _TurnDriver(self.engine, episodes, controls)
            run_episodes(episodes, driver, run_tools, tokenizer, self._settings(max_turns))
            engine_calls += driver.engine_calls
            for position, job_episodes, job_controls, size in group:
                results[position] = self._response(jobs[position], job_episodes, job_controls, size, len(jobs),
                                                   batch_started)
        self.counters["batches"] += 1
        self.counters["requests"] += len(jobs)
        self.counters["engine_calls"] += engine_calls
        self.counters["max_batch_size"] = max(self.counters["max_batch_size"], len(jobs))
        return results

    def _response(self, job: Job, episodes: list, controls: list[_Control], size: tuple[int, int],
                  batch_size: int, batch_started: float) -> dict:
        from rewards.accuracy import extract_answer

        patch = self.config.tools.budgets.patch_factor
        view = episodes[0].view_images[0]
        prompt_tokens = _prompt_length(episodes[0]) + (view.width // patch) * (view.height // patch) - 1
        choices, completion_tokens = [], 0
        for index, (episode, control) in enumerate(zip(episodes, controls)):
            trajectory = episode.trajectory
            final = control.turns[-1]["text"] if control.turns else ""
            completion_tokens += control.generated
            choices.append({
                "index": index,
                "message": {"role": "assistant", "content": final},
                "finish_reason": "stop" if trajectory.finish_reason == "stop" else "length",
                "pixelray_trace": {
                    "finish_reason": trajectory.finish_reason,
                    "answer": extract_answer(final),
                    "turns": control.turns,
                    "operations": operation_trace(trajectory.visual_operations, episode.view_images, control.turns,
                                                  trajectory.finish_reason, job.return_crops),
                },
            })
        now = time.monotonic()
        return {
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "pixelray": {
                "image": {"width": size[0], "height": size[1]},
                "view": {"width": view.width, "height": view.height},
                "batch_size": batch_size,
                "queue_s": round(batch_started - job.received, 4),
                "run_s": round(now - batch_started, 4),
            },
        }


# ------------------------------------------------------------------------------------------------
# The ingress deployment
# ------------------------------------------------------------------------------------------------

app = FastAPI(title="PixelRay", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(ApiError)
async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(error.status_code, "invalid_request_error")
    return JSONResponse(error_body(str(error.detail), kind), status_code=error.status_code,
                        headers=getattr(error, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return JSONResponse(error_body("invalid request parameters"), status_code=400)


@app.exception_handler(Exception)
async def _server_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error")
    return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


def _serve_http_host() -> str | None:
    """The host Serve's HTTP proxies bind (asked of the controller); None if it cannot be told."""
    try:
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return ray.get(controller.get_http_config.remote(), timeout=30).host
    except Exception:  # noqa: BLE001 - unknown: treated as exposed
        return None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "malformed Content-Length")
        if int(declared) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


# Everything the ingress's methods use must be defined above it: `serve.ingress` captures the class
# (and the module globals its methods see) when the decorator runs.


def make_samples() -> dict[str, dict]:
    """The synthetic zoom examples (policies.synthetic): a small coloured square on a large textured
    canvas, with the question and the square's box (normalized) as a hint."""
    import io
    import random

    from policies.synthetic import QUESTION, SyntheticZoomSpec, draw_example

    samples = {}
    for seed in SAMPLE_SEEDS:
        image, colour, box = draw_example(SyntheticZoomSpec(), random.Random(seed))[:3]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        name = f"zoom-{seed}"
        samples[name] = {"name": name, "url": f"samples/{name}.png", "question": QUESTION, "answer": colour,
                         "hint_box": [round(v, 4) for v in box], "width": image.width, "height": image.height,
                         "png": buffer.getvalue()}
    return samples


@serve.deployment(name="PixelRayIngress")
@serve.ingress(app)
class PixelRayIngress:
    def __init__(self, reasoner, config: dict):
        self.config = ServeAppConfig.model_validate(config)
        self.reasoner = reasoner
        self.key_hash = self.config.auth.resolved_hash()
        self.host = _serve_http_host()
        check_key_policy(self.host, self.key_hash)  # fail closed: the deployment does not start
        self.created = int(time.time())
        self._samples: dict[str, dict] | None = None
        self._samples_lock = threading.Lock()

    def _authorize(self, request: Request) -> None:
        authorize(request.headers.get("authorization"), self.key_hash)

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.config.served_model_name}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.config.served_model_name, "object": "model",
                                            "created": self.created, "owned_by": "pixelray"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> JSONResponse:
        started = time.monotonic()
        self._authorize(request)
        limits = self.config.limits
        body = await _read_body(request, limits.max_request_bytes)
        # Parsing and decoding (up to max_request_bytes of JSON and base64) run off the event loop.
        parsed = await asyncio.to_thread(parse_chat_request, body, self.config)
        if image_url_kind(parsed.image_url) == "data":
            raw = await asyncio.to_thread(decode_data_url, parsed.image_url, limits)
        else:
            raw = await asyncio.to_thread(fetch_remote_image, parsed.image_url, limits)
        pixels = await asyncio.to_thread(decode_image, raw, limits)
        request_id = "chatcmpl-" + uuid.uuid4().hex
        job = Job(request_id=request_id, question=parsed.question, image=[ray.put(pixels)], n=parsed.n,
                  temperature=parsed.temperature, top_p=parsed.top_p, max_tokens=parsed.max_tokens,
                  max_turns=parsed.max_turns, seed=parsed.seed, timeout_s=parsed.timeout_s,
                  return_crops=parsed.return_crops, forced_call=parsed.forced_call)
        del pixels

        async def call() -> dict:
            return await self.reasoner.complete.remote(job)

        try:
            result = await asyncio.wait_for(call(), timeout=parsed.timeout_s + limits.timeout_grace_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"the request did not finish within {parsed.timeout_s:g} s", type_="server_error",
                           code="timeout") from None
        if "error" in result:
            raise ApiError(result["error"]["status"], result["error"]["message"])
        result["pixelray"]["total_s"] = round(time.monotonic() - started, 4)
        return JSONResponse({
            "id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": self.config.served_model_name, "system_fingerprint": None, **result,
        })

    @app.get("/")
    async def page(self) -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(),
                            headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                     "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'"})

    @app.get("/samples")
    async def samples(self) -> list[dict]:
        return [{key: value for key, value in sample.items() if key != "png"} for sample in self._sample_set().values()]

    @app.get("/samples/{name}.png")
    async def sample_image(self, name: str) -> Response:
        sample = self._sample_set().get(name)
        if sample is None:
            raise ApiError(404, f"no sample named {name[:40]!r}", type_="not_found_error")
        return Response(sample["png"], media_type="image/png")

    def _sample_set(self) -> dict[str, dict]:
        with self._samples_lock:
            if self._samples is None:
                self._samples = make_samples()
            return self._samples


# ------------------------------------------------------------------------------------------------
# The application
# ------------------------------------------------------------------------------------------------


def build_app(args: dict | None = None):
    """The Serve application (the `import_path` of cluster/launch/serve.yaml): `args` is a
    `ServeAppConfig` as a dict. Builds the tiny model when no model is given, hashes the API key."""
    from cluster.runtime import run_env_vars
    from policies.model import ensure_tiny_model

    config = ServeAppConfig.model_validate(args or {})
    model_path = config.model or str(ensure_tiny_model(config.tiny))
    key_hash = config.auth.resolved_hash()
    config = config.model_copy(update={"auth": config.auth.model_copy(
        update={"api_key": None, "api_key_env": None, "api_key_sha256": key_hash})})
    payload = config.model_dump(mode="json")
    rollout, scaling, batching, ingress = config.rollout, config.autoscaling, config.batching, config.ingress
    env = run_env_vars(config)
    autoscaling = {
        "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
        "target_ongoing_requests": scaling.target_ongoing_requests,
        "upscale_delay_s": scaling.upscale_delay_s, "downscale_delay_s": scaling.downscale_delay_s,
    }
    if scaling.initial_replicas is not None:
        autoscaling["initial_replicas"] = scaling.initial_replicas
    reasoner = PixelReasoner.options(
        ray_actor_options={"num_cpus": rollout.num_cpus, "num_gpus": rollout.num_gpus,
                           "runtime_env": {"env_vars": env}},
        autoscaling_config=autoscaling,
        # Enough requests must reach a replica to fill a batch while the previous one runs.
        max_ongoing_requests=2 * batching.max_batch_size,
        health_check_timeout_s=120,
    ).bind(payload, model_path)
    return PixelRayIngress.options(
        num_replicas=ingress.num_replicas,
        ray_actor_options={"num_cpus": ingress.num_cpus, "runtime_env": {"env_vars": env}},
        max_ongoing_requests=ingress.max_ongoing_requests,
        max_queued_requests=ingress.max_queued_requests,
    ).bind(reasoner, payload)


app_builder = build_app


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def load_serve_config(config_file: str | None, overrides: list[str]) -> ServeAppConfig:
    """The app args of a Serve config file (its first application's `args`) or a plain mapping of
    them, then dotted overrides."""
    import yaml
    from pydantic import ValidationError

    from cluster.config import ConfigError, _apply_override

    tree: dict = {}
    if config_file:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_file}: the top level must be a mapping")
        if "applications" in loaded:
            tree = dict(loaded["applications"][0].get("args") or {})
        else:
            tree = loaded
    for override in overrides:
        _apply_override(tree, override)
    try:
        return ServeAppConfig.model_validate(tree)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"invalid serve config: {problems}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cluster.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Qwen2.5-VL folder or hub id (default: the tiny model, built if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (beyond loopback needs an API key)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--config", help="a Serve config file (cluster/launch/serve.yaml) or a YAML of app args")
    parser.add_argument("--num-cpus", type=float, help="logical CPUs of the local Ray cluster (default: all)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the app args, e.g. limits.max_tokens=256")
    return parser.parse_args(argv)


def start_local_ray(num_cpus: float | None = None, env: dict | None = None):
    """Join RAY_ADDRESS if set, else a private local cluster (own temp dir, no dashboard)."""
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=num_cpus,
                 _temp_dir=tempfile.mkdtemp(prefix="pixelray-serve-", dir="/tmp"),
                 runtime_env={"env_vars": env or {}})
    return ray


def main(argv: list[str] | None = None) -> int:
    from cluster.config import ConfigError
    from cluster.runtime import apply_env, run_env_vars

    args = parse_args(argv)
    try:
        config = load_serve_config(args.config, args.overrides)
        if args.model:
            config.model = args.model
        check_key_policy(args.host, config.auth.resolved_hash())
    except (ConfigError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    env = run_env_vars(config)
    apply_env(env)
    start_local_ray(args.num_cpus, env)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(config.model_dump(mode="json")), name=APP_NAME, route_prefix="/")
        print(f"PixelRay serving {config.served_model_name!r} on http://{args.host}:{args.port}/ "
              f"(OpenAI base URL http://{args.host}:{args.port}/v1); Ctrl-C stops", flush=True)
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
