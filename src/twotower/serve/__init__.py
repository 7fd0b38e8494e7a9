"""An OpenAI-compatible ASGI server (FastAPI + uvicorn) over the continuous-batching engine, with
Prometheus metrics and a live playground page."""
