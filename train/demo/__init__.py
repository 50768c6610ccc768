"""Built-in demo tasks."""
