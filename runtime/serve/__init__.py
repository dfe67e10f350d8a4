"""Serving: the continuous-batching engine, the OpenAI-compatible HTTP app, Ray Serve replicas."""
