"""`moetrt serve`: an OpenAI-compatible server over an engine's static KV slots.

    engine.py     what the HTTP surface asks of an engine (TokenEngine: token ids in, cancellable deltas out)
    scheduler.py  the TokenEngine of one process: continuous batching over the backend's KV slots, one engine
                  step at a time on its own thread
    protocol.py   the OpenAI request bodies (pydantic)
    app.py        the FastAPI app factory (/v1/models, /v1/completions, /v1/chat/completions, /health, /metrics)
    metrics.py    Prometheus metrics (prometheus-client)
    server.py     uvicorn over the app and a Scheduler; bounded drain on SIGINT/SIGTERM

Nothing is imported here: the package needs the `serve` extra (fastapi, uvicorn, prometheus-client).
"""
