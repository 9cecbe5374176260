"""The OpenAI-compatible HTTP server (`pnl serve`); see api_server.py."""
