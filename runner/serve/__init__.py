"""`python -m runner serve`: the runner as a warm OpenAI-compatible server (README, "The server").

    app.py           the HTTP endpoints on Starlette, the app and its start-up (the HTTP process)
    api.py           OpenAI's shapes: the error object, request fields, completions and stream chunks
    worker.py        the engine process, which runs the models, and the messages between the two
    engines.py       one thread per bundle: dynamic batching (CLIP), continuous batching (Function-Gemma)
    prefix_cache.py  the KV cache of shared prompt prefixes, bounded, saved to a directory
    metrics.py       what /metrics shows (prometheus_client)

Needs the packages of runner/requirements-serve.txt (the `serve` extra); the other
commands run without them.
"""
