"""The OpenAI-compatible HTTP API a jinfer server serves beside gRPC (ServingConfig.http_port).

protocol.py checks request bodies and maps them to SamplingParams; views.py turns outputs into
response bodies and SSE chunks; app.py is the Starlette app over the server's Frontend;
host.py runs it under uvicorn on its own thread.
"""

from jinfer.serving.openai.app import OpenAIApi
from jinfer.serving.openai.host import HttpHost

__all__ = ["HttpHost", "OpenAIApi"]
