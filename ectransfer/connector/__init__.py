"""Framework-neutral connector lifecycle (never imports vLLM)."""
