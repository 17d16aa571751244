"""One YAML, every stage: data -> train -> eval -> gate -> serve as Ray jobs."""
