"""Evaluation: rolling perplexity and two-export comparison; the runtime's check against golden vectors."""
