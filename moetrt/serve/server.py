"""`moetrt serve`: the OpenAI app under uvicorn over an in-process `Scheduler`, with a bounded drain.

Start-up order: the HTTP server listens first (GET /health answers 503 while the model loads, as
llama-server does), then the engine directory is opened and the app starts serving it. uvicorn runs on a
thread of its own so that this (main) thread owns SIGINT/SIGTERM: the first signal stops accepting
connections and lets in-flight requests finish for up to `drain_timeout` seconds (uvicorn's graceful
shutdown, which then cancels what is left; cancelled requests free their slots), after which the engine
thread stops, the engine is closed and `serve` returns normally (exit status 0). A second Ctrl-C forces
the exit without waiting.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn

from moetrt.artifacts import open_artifact
from moetrt.errors import MoetrtError
from moetrt.routes.live import ExpertLoad
from moetrt.runtime.text_model import TextModel
from moetrt.serve.app import Served, create_app, set_served
from moetrt.serve.metrics import Metrics
from moetrt.serve.scheduler import Scheduler

START_TIMEOUT_S = 30.0  # for uvicorn to bind its socket


def serve(
    engine_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    slots: int | None = None,
    max_queue: int = 64,
    api_key: str | None = None,
    served_model_name: str | None = None,
    threads: int | None = None,
    drain_timeout: float = 30.0,
    expert_metrics: bool = False,
    progress: Callable[[str], None] = lambda message: None,
) -> None:
    """Serve `engine_dir` (an engine directory, or a checkpoint run eagerly) until SIGINT/SIGTERM.

    slots: KV slots = concurrent requests (default: the engine's max_batch; 1 for a checkpoint); max_queue:
    requests waiting beyond the slots before 429s; threads: the engine's CPU threads; expert_metrics: count
    each layer's expert load on /metrics (`moetrt.routes.live`; the engine returns its routing). `progress` receives
    one-line status messages (where it listens, when it is ready, when it drains). Raises MoetrtError when
    the address cannot be bound or the engine cannot be opened."""
    if max_queue < 0:
        raise MoetrtError(f"--max-queue: expected >= 0, found {max_queue}")
    if slots is not None and slots < 1:
        raise MoetrtError(f"--slots: expected >= 1, found {slots}")
    metrics = Metrics()
    app = create_app(api_key=api_key, metrics=metrics)
    config = uvicorn.Config(
        app, host=host, port=port, timeout_graceful_shutdown=drain_timeout, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    http = threading.Thread(target=server.run, name="moetrt-http")

    def on_signal(sig: int, frame: FrameType | None) -> None:
        if server.should_exit:
            server.force_exit = True
            return
        server.should_exit = True
        progress(f"draining: finishing in-flight requests (at most {drain_timeout:g} s), then exiting")

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    model = scheduler = None
    try:
        http.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started and http.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not server.started:
            server.should_exit = True
            raise MoetrtError(f"cannot listen on {host}:{port} (address in use or not available)")
        progress(f"listening on http://{host}:{port} (loading {engine_dir}; /health answers 503 until ready)")
        artifact = open_artifact(engine_dir)
        expert_load = None
        if expert_metrics:
            config = artifact.config
            expert_load = ExpertLoad(config.num_hidden_layers, config.num_local_experts, registry=metrics.registry)
        outputs = expert_load.outputs if expert_load else ()
        model = TextModel.open(artifact, max_batch=slots, threads=threads, extra_outputs=outputs)
        on_step = expert_load.observe if expert_load else None
        scheduler = Scheduler(model.backend, max_queue=max_queue, metrics=metrics, on_step=on_step)
        name = served_model_name or model.name
        set_served(app, Served(name, model, scheduler))
        progress(f"ready: model {name!r}, {scheduler.slots} slots, max_seq_len {scheduler.max_seq_len}")
        while http.is_alive():
            http.join(0.2)
    except BaseException:
        server.should_exit = True
        raise
    finally:
        if http.ident is not None:
            http.join(drain_timeout + 5.0)
        set_served(app, None)
        if scheduler is not None:
            scheduler.close()
        if model is not None:
            model.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
