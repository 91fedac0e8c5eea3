"""The HTTP API (FastAPI): admin endpoints, injection, liveness."""
