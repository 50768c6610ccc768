"""The task-prefix router in front of vLLM (issue 3; not built yet)."""
