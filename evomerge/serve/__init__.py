"""`evomerge serve`: an OpenAI-compatible HTTP server over a local HF checkpoint."""

from __future__ import annotations

from .server import OpenAIServer, create_app, make_server, start_in_thread
from .service import ModelService, Sampling

__all__ = ["ModelService", "OpenAIServer", "Sampling", "create_app", "make_server", "start_in_thread"]
