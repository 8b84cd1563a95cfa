"""`moetrt serve --ray` on a local Ray cluster (127.0.0.1, 2 CPUs): two engine replicas of the tiny checkpoint
(eager, 2 KV slots each) behind the ingress that serves the same OpenAI app as `moetrt serve`.

A burst of concurrent streaming requests with the `openai` client is spread over both replicas (per-replica
counts from /metrics) and every answer equals the single-server answer (the same app over an in-process
Scheduler). Then one replica's actor is killed during a burst: every request completes with the single-server
answer or ends with a clean 503 error within a bounded time, and the deployment returns to 2 healthy replicas.
Starting Ray and the deployment dominates the time (~1 min on a loaded two-core machine): one cluster serves
the module.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import shutil
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from moetrt.cli import app as cli  # noqa: E402
from moetrt.errors import MoetrtError  # noqa: E402
from moetrt.runtime.sampling import SamplingParams  # noqa: E402
from moetrt.runtime.text_model import TextModel  # noqa: E402
from moetrt.serve.app import Served, create_app  # noqa: E402
from moetrt.serve.engine import EngineUnavailable, GenerationRequest  # noqa: E402
from moetrt.serve.metrics import Metrics  # noqa: E402
from moetrt.serve.ray_serve import (  # noqa: E402
    APP_NAME,
    ENGINE_DEPLOYMENT,
    METRICS_REFRESH_S,
    EngineReplica,
    RayOptions,
    ReplicaMetrics,
    deploy,
)
from moetrt.serve.scheduler import Scheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# The cluster tests; the others check what runs before Ray is imported, or replica objects without Ray.
cluster = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="ray[serve] is not installed (pip install -e '.[ray]')"
)

MODEL, SLOTS, REPLICAS = "tiny-moe", 2, 2
GENERATED = "moetrt_generation_tokens_total"
PROMPTS = [
    "The quick brown fox",
    "Mixture-of-Experts language models route every token",
    "Sphinx of black quartz",
    "0123",
    "How vexingly",
    "Deployment engineers export the model",
    "a",
    "Grouped-query attention shares each key and value head",
]
BURST = [(prompt, 12 + 3 * i) for i, prompt in enumerate(PROMPTS)]
LONG = [(prompt, 160) for prompt in PROMPTS]  # EOS ignored: the requests outlive the kill


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def stream_text(base: str, prompt: str, max_tokens: int, started: threading.Event | None = None) -> str:
    """The streamed completion's text (greedy, EOS ignored); `started` is set at the first text chunk."""
    parts = []
    chunks = client(base).completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].text:
            parts.append(chunk.choices[0].text)
            if started is not None:
                started.set()
    return "".join(parts)


def per_replica(base: str, name: str, **labels: str) -> dict[str, float]:
    """The samples `name{labels}` of the ingress's /metrics, summed per engine replica."""
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                replica = sample.labels["replica"]
                counts[replica] = counts.get(replica, 0.0) + sample.value
    return counts


def replica_ids(base: str) -> list[str]:
    return sorted(per_replica(base, "moetrt_slots"))


def wait_for(condition, timeout: float, what: str, period: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            assert value, f"timed out after {timeout} s waiting for {what}"
            return value
        time.sleep(period)


@contextlib.contextmanager
def single_server(checkpoint):
    """`moetrt serve`'s app over an in-process Scheduler, under uvicorn on a thread."""
    model = TextModel.open(checkpoint, max_batch=SLOTS, threads=1)
    scheduler = Scheduler(model.backend)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(Served(MODEL, model, scheduler)), port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 60, "the single server")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        scheduler.close()
        model.close()


@pytest.fixture(scope="module")
def expected(tiny_checkpoint):
    """The single server's answers to BURST and LONG, one request at a time."""
    with single_server(tiny_checkpoint) as base, ThreadPoolExecutor(SLOTS) as pool:
        return dict(zip(BURST + LONG, pool.map(lambda job: stream_text(base, *job), BURST + LONG), strict=True))


@pytest.fixture(scope="module")
def ray_server(tiny_checkpoint):
    import ray
    from ray import serve

    for attempt in range(3):
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            break
        except Exception:  # the raylet gives up when its agents take > 15 s to start (ray-project/ray#65983)
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        options = RayOptions(replicas=REPLICAS, slots=SLOTS, threads=1, served_model_name=MODEL)
        yield deploy(tiny_checkpoint, "127.0.0.1", free_port(), options)
    finally:
        serve.shutdown()
        ray.shutdown()


def engine_replicas() -> dict:
    from ray import serve

    return dict(serve.status().applications[APP_NAME].deployments[ENGINE_DEPLOYMENT].replica_states)


@cluster
@pytest.mark.slow
def test_burst_is_spread_over_replicas_and_equals_the_single_server(ray_server, expected):
    assert [m.id for m in client(ray_server).models.list()] == [MODEL]
    with ThreadPoolExecutor(len(BURST)) as pool:
        answers = list(pool.map(lambda job: stream_text(ray_server, *job), BURST))
    assert answers == [expected[job] for job in BURST]

    def finished() -> dict[str, float]:
        counts = per_replica(ray_server, "moetrt_requests_finished_total")
        return counts if sum(counts.values()) >= len(BURST) else {}

    counts = wait_for(finished, 20, "every request counted by the replicas' metrics")
    assert len(counts) == REPLICAS and all(n > 0 for n in counts.values()), f"per-replica requests: {counts}"


@cluster
@pytest.mark.slow
def test_a_client_that_disconnects_cancels_its_request_on_the_replica(ray_server):
    def total(name: str, **labels: str) -> float:
        return sum(per_replica(ray_server, name, **labels).values())

    time.sleep(2 * METRICS_REFRESH_S)  # the counts below include everything before this test
    cancelled, tokens = total("moetrt_requests_finished_total", finish_reason="cancelled"), total(GENERATED)
    stream = client(ray_server).completions.create(
        model=MODEL, prompt="The", max_tokens=500, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    wait_for(
        lambda: total("moetrt_requests_finished_total", finish_reason="cancelled") == cancelled + 1,
        30, "the request cancelled on its replica",
    )  # fmt: skip
    assert wait_for(lambda: total("moetrt_slots_busy") == 0, 10, "every slot free")
    assert total(GENERATED) - tokens < 400, "the replica stopped long before max_tokens"


@cluster
@pytest.mark.slow
def test_a_killed_replica_fails_only_its_running_requests_and_is_replaced(ray_server, expected):
    import ray

    replicas = wait_for(lambda: len(ids := replica_ids(ray_server)) == REPLICAS and ids, 20, "replica ids")
    started = {job: threading.Event() for job in LONG}
    with ThreadPoolExecutor(len(LONG)) as pool:
        futures = {job: pool.submit(stream_text, ray_server, *job, started[job]) for job in LONG}
        wait_for(lambda: sum(e.is_set() for e in started.values()) >= REPLICAS * SLOTS, 60, "a full burst")
        in_flight = [job for job, future in futures.items() if not future.done()]
        streaming = [job for job in in_flight if started[job].is_set()]
        victim = ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{ENGINE_DEPLOYMENT}#{replicas[0]}", namespace="serve")
        ray.kill(victim, no_restart=True)
        outcomes = {}
        for job, future in futures.items():
            try:
                text = future.result(timeout=90)
                outcomes[job] = "completed" if text == expected[job] else f"WRONG TEXT {text!r}"
            except openai.APIError as err:
                outcomes[job] = f"error: {err.message}"
    record = {"in flight at the kill": len(in_flight), "of them streaming": len(streaming)}
    print("fault test:", record, {prompt: outcome for (prompt, _), outcome in outcomes.items()})
    assert all(o == "completed" or o.startswith("error: the engine ended the request") for o in outcomes.values())
    assert 0 < list(outcomes.values()).count("completed") < len(LONG), "the surviving replica kept serving"
    wait_for(lambda: engine_replicas() == {"RUNNING": REPLICAS}, 120, "2 running replicas", period=1.0)
    after = wait_for(lambda: len(ids := replica_ids(ray_server)) == REPLICAS and ids, 30, "the new replica's metrics")
    assert replicas[0] not in after and replicas[1] in after
    assert stream_text(ray_server, *BURST[0]) == expected[BURST[0]]


@cluster
@pytest.mark.slow
def test_a_bad_engine_fails_the_deployment_with_one_line(ray_server, tiny_checkpoint, tmp_path):
    """The directory reads as a checkpoint where the driver looks (config.json), but the replica cannot load
    its weights: the replica's own one-line error is what `moetrt serve --ray` reports."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MoetrtError) as err:
        deploy(bad, "127.0.0.1", free_port(), RayOptions(replicas=1, slots=SLOTS, threads=1))
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("the Ray Serve deployment failed: ") and "model.safetensors: not a readable" in message


# --- without a cluster -------------------------------------------------------------------------------------
async def drain(stream) -> str | None:
    reason = None
    async for delta in stream:
        reason = delta.finish_reason
    return reason


def test_replica_health_check_reports_a_failed_step_and_a_stopped_engine(tiny_checkpoint):
    """`check_health` (what Serve calls) on a real replica object: healthy; after its engine fails a step,
    unhealthy (Serve replaces it); after the engine thread stops, unhealthy."""
    replica = EngineReplica(str(tiny_checkpoint), SLOTS, 1, SLOTS)
    request = GenerationRequest(prompt_ids=[1, 5, 6], max_tokens=4, sampling=SamplingParams())
    try:
        assert replica.limits() == {"slots": SLOTS, "max_seq_len": 512, "vocab_size": replica.scheduler.vocab_size}
        assert asyncio.run(asyncio.wait_for(drain(replica.generate(request)), 60)) == "length"
        replica.check_health()
        replica.backend.close()  # the engine dies: its next step raises
        assert asyncio.run(asyncio.wait_for(drain(replica.generate(request)), 60)) == "error"
        with pytest.raises(EngineUnavailable, match="the last engine step failed"):
            replica.check_health()
        replica.scheduler.close()
        with pytest.raises(EngineUnavailable, match="the engine thread has stopped"):
            replica.check_health()
    finally:
        replica.scheduler.close()


def test_replica_metrics_are_merged_with_a_replica_label():
    first, second = Metrics(), Metrics()
    first.generation_tokens.inc(3)
    second.generation_tokens.inc(5)
    second.finished.labels("length").inc()
    collector = ReplicaMetrics()
    collector.update([("r1", first.render()[0].decode()), ("r2", second.render()[0].decode())])
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("moetrt_generation_tokens_total", (("replica", "r1"),))] == 3
    assert samples[("moetrt_generation_tokens_total", (("replica", "r2"),))] == 5
    assert samples[("moetrt_requests_finished_total", (("finish_reason", "length"), ("replica", "r2")))] == 1
    assert text.count("# TYPE moetrt_generation_tokens_total counter") == 1  # one family, two replicas


@pytest.mark.parametrize(
    "args, error",
    [
        (["--replicas", "2"], "--replicas, --autoscale and --ray-address need --ray"),
        (["--ray", "--autoscale", "3"], "--autoscale: expected MIN:MAX (two integers), found '3'"),
        (["--ray", "--autoscale", "1:2", "--replicas", "2"], "--replicas and --autoscale exclude each other"),
        (["--ray", "--autoscale", "3:2"], "--autoscale: expected MIN:MAX with 1 <= MIN <= MAX, found 3:2"),
        (["--ray", "--replicas", "0"], "--replicas: expected >= 1, found 0"),
    ],
)
def test_serve_ray_arguments_are_checked_before_ray_starts(tiny_checkpoint, args, error):
    result = CliRunner().invoke(cli, ["serve", str(tiny_checkpoint), *args])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {error}"
