"""Serving: vLLM multi-LoRA from the adapter registry (issue 3; not built yet)."""
