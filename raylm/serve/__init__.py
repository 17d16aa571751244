"""Serving: an OpenAI-compatible Ray Serve app over vLLM (ray.serve.llm), and batch inference."""
