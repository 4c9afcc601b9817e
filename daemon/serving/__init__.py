"""Serving: text in and out, sampling, the OpenAI-compatible endpoint and its access control."""
