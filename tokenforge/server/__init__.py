"""The OpenAI-compatible HTTP server (FastAPI); see README.md in this folder."""
