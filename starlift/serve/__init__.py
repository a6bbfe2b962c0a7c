"""The HTTP server (``starlift[serve]``): OpenAI's completions and chat completions, llama.cpp's
``/infill`` (or ``/v1/classify`` for a classification artifact), ``/v1/models``, ``/health`` and Prometheus ``/metrics`` over one engine.

``create_app(starlift.load(ARTIFACT), model_name=...)`` is a FastAPI app; ``starlift serve``
runs it under uvicorn. See docs/guide/serve.md.
"""

from .app import ApiError, chat_template_of, create_app, create_classify_app

__all__ = ["ApiError", "chat_template_of", "create_app", "create_classify_app"]
