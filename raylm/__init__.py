"""raylm: the LLM lifecycle as Ray jobs."""
