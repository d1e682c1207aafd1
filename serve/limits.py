"""The server's bounds on what one client may ask for, and their defaults (the flags of `prefix_serve --help`).

Kept apart from app.py so that the command line can name them without importing the web stack.
"""
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # --max_body_bytes: a larger request body is a 413, answered unread
CHARS_PER_POSITION = 32  # --max_prompt_chars defaults to this many characters per position of the context
DEFAULT_MAX_LORAS = 64   # --max_loras: tasks loaded at once
MAX_LOGPROBS = 20  # most alternatives per token (vLLM's default --max-logprobs)
