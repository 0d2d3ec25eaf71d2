"""`evomerge serve`: an OpenAI-compatible HTTP server over a local HF checkpoint."""

from __future__ import annotations

from .server import ModelService, OpenAIServer, make_server, start_in_thread

__all__ = ["ModelService", "OpenAIServer", "make_server", "start_in_thread"]
