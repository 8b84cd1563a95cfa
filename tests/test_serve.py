"""`moetrt serve` end to end: a real server process on 127.0.0.1 (a free port), the official `openai` client.

The server runs the tiny checkpoint eagerly with 4 KV slots; its config is copied with a 4096-token context so
that a long request cannot finish while a test is still filling the slots and the queue, and it gets
Mixtral-Instruct's chat template. Every wait is a bounded poll.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from moetrt.model.tokenizer import Tokenizer  # noqa: E402
from moetrt.runtime.textgen import run_generate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = "tiny-moe"
API_KEY = "test-key"
SLOTS, MAX_QUEUE, MAX_SEQ_LEN = 4, 16, 4096
LONG = {"max_tokens": 4000, "extra_body": {"ignore_eos": True}}  # a request that outlives any test
# Mixtral-8x7B-Instruct-v0.1's original chat template (it refuses system messages).
MIXTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
PROMPTS = [
    "The quick brown fox",
    "Mixture-of-Experts language models route every token",
    "Sphinx of black quartz",
    "0123",
    "Grouped-query attention shares each key and value head among several query heads; rotary position",
    "How vexingly",
    "Deployment engineers export the model",
    "a",
]


@dataclass
class Server:
    base: str
    proc: subprocess.Popen
    health: list[int]  # /health statuses seen while starting
    log: Path

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=api_key, max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"{self.base}/metrics", timeout=10).read().decode()
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }

    def wait_metric(self, name: str, value: float, timeout: float = 20.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            metrics = self.metrics()
            if metrics.get(name) == value or time.monotonic() > deadline:
                assert metrics.get(name) == value, f"{name} = {metrics.get(name)}, expected {value}"
                return metrics
            time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "tiny-chat"
    shutil.copytree(tiny_checkpoint, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": MAX_SEQ_LEN}))
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(
        json.dumps({**tokenizer_config, "chat_template": MIXTRAL_CHAT_TEMPLATE})
    )
    return path


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    port, log = free_port(), tmp_path_factory.mktemp("serve-log") / "server.log"
    command = [
        sys.executable, "-m", "moetrt", "serve", str(checkpoint), "--port", str(port), "--slots", str(SLOTS),
        "--max-queue", str(MAX_QUEUE), "--api-key", API_KEY, "--served-model-name", MODEL, "--threads", "1",
        "--expert-metrics",
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    base, health = f"http://127.0.0.1:{port}", []
    deadline = time.monotonic() + 180
    while (not health or health[-1] != 200) and proc.poll() is None and time.monotonic() < deadline:
        try:
            health.append(urllib.request.urlopen(f"{base}/health", timeout=5).status)
        except urllib.error.HTTPError as err:
            health.append(err.code)
        except OSError:
            pass
        time.sleep(0.05)
    if not health or health[-1] != 200:
        proc.kill()
        pytest.fail(f"server did not become ready: {log.read_text()}")
    yield Server(base, proc, health, log)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def completion(client: openai.OpenAI, stream: bool = False, **kwargs):
    """Text, finish_reason, usage (streamed: the chunks' text joined; usage from the include_usage chunk)."""
    args = {"model": MODEL, "temperature": 0, **kwargs}
    if not stream:
        answer = client.completions.create(**args)
        return answer.choices[0].text, answer.choices[0].finish_reason, answer.usage
    parts, finish, usage = [], None, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **args):
        if chunk.choices:
            assert finish is None, "no text after the finish_reason chunk"
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason
        else:
            usage = chunk.usage
    return "".join(parts), finish, usage


def test_health_models_auth_and_metrics(server):
    assert server.health[0] == 503 and server.health[-1] == 200, "/health answers 503 while the model loads"
    assert [m.id for m in server.client().models.list()] == [MODEL]
    with pytest.raises(openai.AuthenticationError) as err:
        server.client(api_key="wrong").models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert server.metrics()["moetrt_slots"] == SLOTS


def test_expert_load_metrics_count_every_token_a_step_runs(server):
    """--expert-metrics: each step's routing is counted once per token and selected expert (top-2 here)."""

    def routed(metrics: dict[str, float], layer: int) -> float:
        name = "moetrt_expert_tokens_total"
        return sum(v for k, v in metrics.items() if k.startswith(name) and f'layer="{layer}"' in k)

    before = server.wait_metric("moetrt_slots_busy", 0)
    usage = completion(server.client(), prompt="Sphinx", max_tokens=5, extra_body={"ignore_eos": True})[2]
    after = server.metrics()
    tokens = usage.prompt_tokens + usage.completion_tokens - 1  # the last token is sampled, never run
    assert [routed(after, i) - routed(before, i) for i in range(2)] == [2 * tokens, 2 * tokens]
    assert 0 < after['moetrt_expert_balancedness{layer="0"}'] <= 1


def test_greedy_completion_equals_moetrt_generate(server, checkpoint):
    for prompt in PROMPTS[:2]:
        expected = run_generate(checkpoint, prompts=[prompt], token_ids=[], max_new_tokens=24)
        text, finish, usage = completion(server.client(), prompt=prompt, max_tokens=24)
        assert text == expected["text"]
        assert usage.completion_tokens == len(expected["token_ids"])
        assert usage.prompt_tokens == len(expected["prompt_token_ids"])
        assert finish == expected["finish_reasons"][0]


def test_streamed_text_equals_non_streamed(server):
    client = server.client()
    for prompt in PROMPTS[3:6]:
        assert completion(client, prompt=prompt, max_tokens=30) == completion(
            client, True, prompt=prompt, max_tokens=30
        )
    messages = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "Say more"},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=30, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_completion_tokens=30, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage
    assert chunks[-2].choices[0].finish_reason == answer.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == answer.choices[0].message.content
    assert answer.usage.completion_tokens > 0 and answer.choices[0].message.role == "assistant"
    system = [{"role": "system", "content": "Be brief."}, messages[0]]  # folded into the first user turn
    assert client.chat.completions.create(model=MODEL, messages=system, max_tokens=2).usage.completion_tokens >= 1


def test_concurrent_requests_equal_their_solo_answers(server):
    """16 greedy requests with different prompts and lengths over 4 slots: nothing lost, nothing mixed."""
    client = server.client()
    jobs = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 4 + 2 * i) for i in range(16)]
    solo = [completion(client, prompt=p, max_tokens=n) for p, n in jobs]
    with ThreadPoolExecutor(16) as pool:
        together = list(
            pool.map(
                lambda job: completion(client, job[0] % 2 == 1, prompt=job[1][0], max_tokens=job[1][1]), enumerate(jobs)
            )
        )
    assert together == solo


def test_disconnect_mid_stream_frees_the_slot(server):
    before = server.metrics()
    stream = server.client().completions.create(model=MODEL, prompt="The", temperature=0, stream=True, **LONG)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    after = server.wait_metric("moetrt_slots_busy", 0)
    cancelled = 'moetrt_requests_finished_total{finish_reason="cancelled"}'
    assert after[cancelled] == before.get(cancelled, 0) + 1
    assert after["moetrt_generation_tokens_total"] - before["moetrt_generation_tokens_total"] < 1000
    # A non-streamed request whose client gives up (closes the connection) is cancelled too.
    impatient = openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=MODEL, prompt="The", temperature=0, **LONG)
    final = server.wait_metric("moetrt_slots_busy", 0)
    assert final[cancelled] == before.get(cancelled, 0) + 2


def test_full_queue_429_and_cancelled_queued_requests_never_run(server):
    client = server.client()
    before = server.metrics()
    running = [client.completions.create(model=MODEL, prompt="The", stream=True, **LONG) for _ in range(SLOTS)]
    server.wait_metric("moetrt_slots_busy", SLOTS)
    queued = [
        client.completions.create(model=MODEL, prompt="Pack my box", stream=True, **LONG) for _ in range(MAX_QUEUE)
    ]
    server.wait_metric("moetrt_num_requests_waiting", MAX_QUEUE)
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model=MODEL, prompt="one more", max_tokens=2)
    assert err.value.status_code == 429 and err.value.body["code"] == "queue_full"
    for stream in queued:
        stream.close()
    after = server.wait_metric("moetrt_num_requests_waiting", 0)
    assert after["moetrt_slots_busy"] == SLOTS, "cancelling queued requests does not touch running ones"
    assert after["moetrt_prompt_tokens_total"] == before["moetrt_prompt_tokens_total"] + SLOTS * 2  # <s> The
    for stream in running:
        stream.close()
    server.wait_metric("moetrt_slots_busy", 0)


def test_stop_strings_split_across_tokens_are_not_leaked(server, checkpoint):
    prompt, n = "The quick brown fox", 40
    result = run_generate(checkpoint, prompts=[prompt], token_ids=[], max_new_tokens=n)
    decoder = Tokenizer.from_dir(checkpoint).detokenizer(result["prompt_token_ids"])
    pieces = [decoder.push(t) for t in result["token_ids"]]
    full = "".join(pieces)
    # A stop string made of the end of one token, a whole token and the start of the next.
    k = next(i for i in range(len(pieces) - 2) if all(len(p) >= 2 and p.isprintable() for p in pieces[i : i + 3]))
    stop = pieces[k][-1] + pieces[k + 1] + pieces[k + 2][0]
    expected = full[: full.index(stop)]
    client = server.client()
    for stream in (False, True):
        text, finish, _ = completion(client, stream, prompt=prompt, max_tokens=n, stop=[stop, "\x00never"])
        assert (text, finish) == (expected, "stop")
        # A stop string whose start appears but which never completes: the held-back text comes out at the end.
        partial = pieces[k][-1] + pieces[k + 1] + "\x00"
        text, finish, _ = completion(client, stream, prompt=prompt, max_tokens=n, stop=[partial])
        assert text == completion(client, prompt=prompt, max_tokens=n)[0]


def post(server: Server, path: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{server.base}{path}", body, {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}] * 2}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "tool", "content": "a"}]},
            400,
            "messages[0].role",
        ),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2}, 400, "n"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi " * MAX_SEQ_LEN}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": MAX_SEQ_LEN}, 400, "max_tokens"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/nothing", {}, 404, None),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, path, body, status, param):
    code, answer = post(server, path, body if isinstance(body, bytes) else json.dumps(body).encode())
    assert code == status and answer["error"]["param"] == param and answer["error"]["message"]
    assert completion(server.client(), prompt="ok", max_tokens=2)[2].completion_tokens >= 1


def test_sigterm_drains_in_flight_requests_and_exits_zero(server):
    """Runs last: SIGTERM while a stream is in flight; the stream still completes, then the process exits 0."""
    stream = server.client().completions.create(
        model=MODEL, prompt="The", temperature=0, stream=True, max_tokens=60, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    parts = [next(chunks).choices[0].text]
    server.proc.send_signal(signal.SIGTERM)
    finish = None
    for chunk in chunks:
        parts.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason
    assert finish == "length"
    assert server.proc.wait(60) == 0, server.log.read_text()
    assert "draining" in server.log.read_text()
