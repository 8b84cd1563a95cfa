"""`moetrt serve --ray`: the OpenAI app of `moetrt serve` hosted on Ray Serve, in front of engine replicas.

One implementation of the API, two ways to host it: `moetrt serve` runs `moetrt.serve.app.create_app` under
uvicorn over an in-process `Scheduler`; here the same app is the ingress deployment of a Ray Serve application
and its `TokenEngine` is a handle to an engine deployment whose replicas may sit on other machines. The shape
is ray.serve.llm's (an ingress deployment in front of an engine deployment), without its vLLM dependency.

- Engine replicas (`EngineReplica`): each opens the engine directory itself (a path every node can read), so
  the manifest check runs in every replica and a bad engine fails the deployment with its one-line error.
  A replica owns one `Scheduler` over the engine's KV slots; `max_ongoing_requests` = its slots, so Ray's
  router never sends a replica more requests than it batches, and requests beyond every replica's slots wait
  in the handle's queue (`max_queued_requests`, then 429). A replica reserves its engine threads as Ray CPUs
  (and one GPU for a CUDA engine), so Ray places replicas where cores are free. Serve calls `check_health`
  periodically; a replica whose engine thread stopped or whose last engine step failed is replaced.
- The ingress (`Ingress`): `create_app` over a `Served` whose text side (tokenizer, chat template,
  detokenizer, stop strings) is opened from the same directory and whose engine is `HandleEngine`: a request
  is a streaming call (`handle.options(stream=True)`) on the engine deployment; each `Delta` crosses as one
  streamed object. A client that disconnects cancels the ingress request; cancelling the call cancels the
  replica's generator (asyncio.CancelledError at its next await), which frees the slot before the next step.
- Failures: a replica that dies before a request produced its first delta is invisible to the client (the
  request is resubmitted to a live replica, up to RESUBMITS times); one that dies mid-answer ends the answer
  with the app's 503 error (a JSON body, or an SSE error event before `[DONE]`), which a client may retry.
- /metrics: the ingress's HTTP counts plus every engine replica's scheduler metrics (slots busy, queue,
  tokens, TTFT, ITL) labelled `replica`, collected with `DeploymentHandle.broadcast` every
  METRICS_REFRESH_S seconds.

References: Ray Serve docs (Ray 2.60): deployments and `ray_actor_options`, `serve.ingress` (a late-bound app
from `__serve_build_asgi_app__`), DeploymentHandle streaming and `cancel()`, request cancellation,
`max_ongoing_requests` / `max_queued_requests`, `check_health` and `health_check_period_s`, autoscaling_config,
`DeploymentHandle.broadcast`. Ray is imported only when a function here runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from moetrt.artifacts import open_artifact
from moetrt.errors import MoetrtError
from moetrt.registry import backend_entry
from moetrt.runtime.engine import load_backend
from moetrt.runtime.text_model import TextModel
from moetrt.serve.app import Served, create_app
from moetrt.serve.engine import Delta, EngineUnavailable, GenerationRequest, QueueFull
from moetrt.serve.metrics import Metrics
from moetrt.serve.scheduler import Scheduler

APP_NAME = "moetrt"
ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT = "MoetrtEngine", "MoetrtIngress"
RESUBMITS = 3  # times a request whose replica died before its first delta is sent to another replica
METRICS_REFRESH_S = 2.0
HEALTH_CHECK_PERIOD_S = 5.0
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    """How the application is laid out on the Ray cluster.

    replicas: a fixed number of engine replicas, or autoscale (min, max) replicas (Serve's autoscaler targets
    `slots` ongoing requests per replica); slots: KV slots per replica (default: the engine's max batch, 1 for
    a checkpoint); threads: CPU threads per replica (default: the engine's, else 1), reserved as Ray CPUs;
    max_queue: requests waiting for a free slot across the deployment before 429s."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    slots: int | None = None
    threads: int | None = None
    max_queue: int = 64
    api_key: str | None = None
    served_model_name: str | None = None


# --- the engine deployment ---------------------------------------------------------------------------------
class WatchedBackend:
    """A backend that remembers whether its last step raised (what `EngineReplica.check_health` reports)."""

    def __init__(self, backend: Any):
        self._backend = backend
        self.failure: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        try:
            logits = self._backend.step(*args, **kwargs)
        except Exception as err:
            self.failure = f"{type(err).__name__}: {err}"
            raise
        self.failure = None
        return logits


class EngineReplica:
    """One engine replica: the engine directory opened here, one `Scheduler` over its KV slots."""

    def __init__(self, engine_dir: str, slots: int | None, threads: int, max_queue: int):
        self.backend = WatchedBackend(load_backend(engine_dir, max_batch=slots, threads=threads))
        # The replica's own queue only absorbs the moments when Ray counts a cancelled request as gone before
        # the scheduler has retired it; the deployment's queue is the handle's (max_queued_requests).
        self.scheduler = Scheduler(self.backend, max_queue=max_queue, metrics=Metrics())

    def limits(self) -> dict[str, int]:
        return {
            "slots": self.scheduler.slots,
            "max_seq_len": self.scheduler.max_seq_len,
            "vocab_size": self.scheduler.vocab_size,
        }

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """The request's deltas; cancelling the call (client gone) cancels the request in the scheduler."""
        stream = await self.scheduler.submit(request)
        async for delta in stream:
            yield delta

    def check_health(self) -> None:
        """Serve's health check: raise when the engine cannot serve (Serve then replaces this replica)."""
        if not self.scheduler.running:
            raise EngineUnavailable("the engine thread has stopped")
        if self.backend.failure is not None:
            raise EngineUnavailable(f"the last engine step failed: {self.backend.failure}")

    def metrics(self) -> tuple[str, str]:
        """(this replica's id, its scheduler metrics as Prometheus text)."""
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id, self.scheduler.metrics.render()[0].decode()

    def __del__(self) -> None:
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.close(timeout=5.0)
            self.backend.close()


# --- the ingress deployment --------------------------------------------------------------------------------
def replica_gone() -> tuple[type[BaseException], ...]:
    """What a handle call raises when its replica died or cannot be reached."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return RayActorError, ReplicaUnavailableError, DeploymentUnavailableError


def plain(err: BaseException) -> BaseException:
    """The exception a replica raised, without Ray's wrapping (whose text is the remote traceback)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


class HandleStream:
    """A `TokenStream` over one streaming handle call; its first delta was fetched by `HandleEngine.submit`."""

    def __init__(self, response: Any, first: Delta):
        self._response = response
        self._first = first
        self._done = first.finish_reason is not None

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[Delta]:
        try:
            yield self._first
            while not self._done:
                try:
                    delta = await self._response.__anext__()
                except StopAsyncIteration:
                    delta = Delta([], "error")  # the replica's generator never ends without a finish reason
                except Exception as err:  # the replica died, or its generator raised: the answer ends here
                    reason = (str(plain(err)) or repr(err)).splitlines()[0]
                    log.warning("an engine replica failed mid-request: %s", reason)
                    delta = Delta([], "error")
                self._done = delta.finish_reason is not None
                yield delta
        finally:
            self.cancel()

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            self._response.cancel()


class HandleEngine:
    """The `TokenEngine` of the ingress: requests are streaming calls on the engine deployment's handle."""

    def __init__(self, handle: Any, slots: int, max_seq_len: int, vocab_size: int):
        self._generate = handle.options(stream=True, method_name="generate")
        self.slots, self.max_seq_len, self.vocab_size = slots, max_seq_len, vocab_size

    async def submit(self, request: GenerationRequest) -> HandleStream:
        """Send `request` to a replica and wait for its first delta (so that a full queue or a dead deployment
        is a 429/503 status, not an error inside a stream). Raises QueueFull or EngineUnavailable."""
        from ray.serve.exceptions import BackPressureError

        gone = replica_gone()
        for attempt in range(RESUBMITS + 1):
            response = self._generate.remote(request)
            try:
                return HandleStream(response, await response.__anext__())
            except BackPressureError as err:
                raise QueueFull(str(err)) from None
            except (QueueFull, EngineUnavailable) as err:
                raise type(plain(err))(str(plain(err))) from None
            except StopAsyncIteration:
                raise EngineUnavailable("the engine replica ended the request without an answer") from None
            except gone as err:
                reason = str(plain(err)).splitlines()[0]
                if attempt == RESUBMITS:
                    raise EngineUnavailable(f"no engine replica could take the request: {reason}") from None
                log.warning("an engine replica failed before answering (%s); resubmitting", reason)
                await asyncio.sleep(0.25 * 2**attempt)  # the router learns of the dead replica meanwhile
            except BaseException:
                response.cancel()  # the client went away while the request waited or prefilled
                raise
        raise AssertionError("unreachable")


class ReplicaMetrics:
    """A prometheus-client collector: the engine replicas' metrics, each sample labelled with its replica,
    as fetched last by `refresh`."""

    def __init__(self) -> None:
        self._families: list[Metric] = []

    def collect(self) -> list[Metric]:
        return self._families

    def update(self, texts: list[tuple[str, str]]) -> None:
        families: dict[str, Metric] = {}
        for replica, text in texts:
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value)
        self._families = list(families.values())

    async def refresh(self, handle: Any) -> None:
        """Every METRICS_REFRESH_S: ask every engine replica for its metrics (one that fails to answer within
        the period is left out of that round)."""
        while True:
            with contextlib.suppress(Exception):
                response = handle.broadcast("metrics")
                results = await asyncio.wait_for(response.results_async(return_exceptions=True), METRICS_REFRESH_S)
                self.update([r for r in results if isinstance(r, tuple)])
            await asyncio.sleep(METRICS_REFRESH_S)


class Ingress:
    """The ingress replica: the OpenAI app over a `HandleEngine` (served by `serve.ingress()` through
    `__serve_build_asgi_app__`)."""

    async def __init__(self, engine: Any, engine_dir: str, options: RayOptions):
        limits = await engine.limits.remote()
        text = TextModel.open_text(engine_dir)
        metrics = Metrics()
        for collector in vars(metrics).values():  # the scheduler's families come from the replicas
            if isinstance(collector, MetricWrapperBase) and collector is not metrics.requests:
                metrics.registry.unregister(collector)
        replica_metrics = ReplicaMetrics()
        metrics.registry.register(replica_metrics)
        self._refresh = asyncio.get_running_loop().create_task(replica_metrics.refresh(engine))
        served = Served(options.served_model_name or text.name, text, HandleEngine(engine, **limits))
        self._app = create_app(served, api_key=options.api_key, metrics=metrics)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app


# --- deploying ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """The deployment's sizes, from the options and the directory (read here; every replica opens it again).

    slots: per replica (--slots, else the engine's max batch, 1 for a checkpoint); threads: CPU threads per
    replica and the Ray CPUs it reserves (--threads, else the engine's build threads, else 1); gpus: 1 for a
    CUDA engine; scale: Serve's `num_replicas` or `autoscaling_config`, which targets `slots` ongoing requests
    per replica."""

    path: Path
    slots: int
    threads: int
    gpus: int
    min_replicas: int
    max_replicas: int
    scale: dict[str, Any]

    @classmethod
    def of(cls, engine_dir: str | Path, options: RayOptions) -> Layout:
        """Check the options and read the directory; MoetrtError (one line) for what cannot be deployed."""
        path = Path(engine_dir).resolve()
        artifact = open_artifact(path)
        manifest = artifact.manifest or {}
        slots = options.slots if options.slots is not None else manifest.get("max_batch") or 1
        if slots < 1:
            raise MoetrtError(f"--slots: expected >= 1, found {slots}")
        if options.max_queue < 0:
            raise MoetrtError(f"--max-queue: expected >= 0, found {options.max_queue}")
        cuda = artifact.kind == "engine" and (
            manifest.get("device") == "cuda" or backend_entry(manifest.get("backend")).accelerator == "cuda"
        )
        if options.autoscale is not None:
            low, high = options.autoscale
            if not 1 <= low <= high:
                raise MoetrtError(f"--autoscale: expected MIN:MAX with 1 <= MIN <= MAX, found {low}:{high}")
            autoscaling = {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": slots}
            scale: dict[str, Any] = {"autoscaling_config": autoscaling}
        elif options.replicas < 1:
            raise MoetrtError(f"--replicas: expected >= 1, found {options.replicas}")
        else:
            low, high, scale = options.replicas, options.replicas, {"num_replicas": options.replicas}
        threads = options.threads or manifest.get("threads") or 1
        return cls(path, slots, threads, 1 if cuda else 0, low, high, scale)

    def check_cpus(self, cpus: float) -> None:
        """On a cluster of this machine alone, refuse replicas that cannot all be placed (Serve would wait
        for CPUs that never come)."""
        need = self.min_replicas * self.threads
        if need > cpus:
            raise MoetrtError(
                f"{self.min_replicas} replicas x {self.threads} threads need {need} CPUs; this machine's Ray cluster "
                f"has {cpus:g} (use fewer --replicas or --threads, or join a larger cluster with --ray-address)"
            )


def application(layout: Layout, options: RayOptions) -> Any:
    """The Ray Serve application: the ingress bound to the engine deployment."""
    from ray import serve

    engine = serve.deployment(
        EngineReplica,
        name=ENGINE_DEPLOYMENT,
        max_ongoing_requests=layout.slots,
        max_queued_requests=options.max_queue,
        ray_actor_options={"num_cpus": layout.threads, "num_gpus": layout.gpus},
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        max_constructor_retry_count=1,  # a bad engine directory fails every time: report it at once
        **layout.scale,
    )
    ingress = serve.deployment(
        serve.ingress()(Ingress),
        name=INGRESS_DEPLOYMENT,
        ray_actor_options={"num_cpus": 0},  # it waits on replicas and the network; the engines need the cores
        max_ongoing_requests=max(1000, 4 * layout.slots * layout.max_replicas),
    )
    path = str(layout.path)
    return ingress.bind(engine.bind(path, layout.slots, layout.threads, layout.slots), path, options)


def deploy(engine_dir: str | Path, host: str, port: int, options: RayOptions) -> str:
    """Start Serve's HTTP proxy on host:port (on a Ray cluster this process is connected to) and run the
    application; returns its base URL once every replica is up. Raises MoetrtError (one line) when the
    deployment fails, e.g. a replica cannot open the engine."""
    from ray import serve

    app = application(Layout.of(engine_dir, options), options)
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", logging_config={"log_level": "WARNING"})
    except RuntimeError as err:
        report = [str(err)]  # "Deploying application ... failed"; the replicas' tracebacks are in the status
        with contextlib.suppress(Exception):
            status = serve.status().applications[APP_NAME]
            report += [status.message, *(deployment.message for deployment in status.deployments.values())]
        raise MoetrtError(f"the Ray Serve deployment failed: {deployment_error(chr(10).join(report))}") from None
    return f"http://{host}:{port}"


def deployment_error(report: str) -> str:
    """The one line that explains a failed deployment: the replica's MoetrtError (or last exception) line
    from the tracebacks Serve reports."""
    lines = [line.strip() for line in report.splitlines() if line.strip()]
    ours = [line for line in lines if "MoetrtError: " in line]
    if ours:
        return ours[-1].split("MoetrtError: ", 1)[1]
    errors = [line for line in lines if line.split(":", 1)[0].endswith(("Error", "Exception"))]
    return (errors or lines or ["no reason given"])[-1]


def serve_on_ray(
    engine_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    options: RayOptions = RayOptions(),
    ray_address: str | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> None:
    """`moetrt serve --ray`: connect to the Ray cluster at `ray_address` (None: start one on this machine),
    deploy, serve until SIGINT/SIGTERM, then delete the application (Serve drains in-flight requests) and,
    when this process started the cluster, stop it. Raises MoetrtError (one line)."""
    import ray
    from ray import serve

    layout = Layout.of(engine_dir, options)  # check the arguments and the directory before starting anything
    stop = threading.Event()

    def on_signal(sig: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = False
    try:
        ray.init(address=ray_address or "local", include_dashboard=False, logging_level=logging.WARNING)
        started = ray_address is None
        if started:
            layout.check_cpus(ray.cluster_resources().get("CPU", 0))
        progress(f"Ray cluster: {ray_address or 'started on this machine'}; deploying {engine_dir}")
        url = deploy(engine_dir, host, port, options)
        replicas = f"{layout.min_replicas}-{layout.max_replicas}" if options.autoscale else layout.min_replicas
        progress(f"listening on {url} ({replicas} engine replicas, {layout.slots} slots each); Ctrl-C stops")
        stop.wait()
        progress("stopping: deleting the application (in-flight requests drain first)")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if ray.is_initialized():
            with contextlib.suppress(Exception):
                serve.delete(APP_NAME)
            if started:
                serve.shutdown()
            ray.shutdown()
