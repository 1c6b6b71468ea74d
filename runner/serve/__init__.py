"""`python -m runner serve`: the runner as a warm OpenAI-compatible server (README, "The server").

    app.py           the HTTP endpoints on Starlette, the app and its start-up
    api.py           OpenAI's shapes: the error object, request fields, completions and stream chunks
    engines.py       one thread per bundle: dynamic batching (CLIP), continuous batching (Function-Gemma)
    prefix_cache.py  the KV cache of shared prompt prefixes, bounded, saved to a directory
    metrics.py       what /metrics shows (prometheus_client)

Needs the packages of runner/requirements-serve.txt (the `serve` extra); the other
commands run without them.
"""
