"""`cupaged serve`: an OpenAI-compatible HTTP server on AsyncLLM (app.py builds it)."""
