"""WebSocket Bridge: a relay between LLM controllers and game/device clients."""

__version__ = "2.0.0"
