"""`chatforge serve`: the OpenAI-compatible API, the chat page and its A/B feedback (see app.py)."""
