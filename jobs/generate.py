"""Generate job: offline batch inference with ray.data.llm + vLLM (raylm.serve.job).

The entrypoint `ray job submit -- python jobs/generate.py CONFIG.yaml key=value ...` names;
every job runs through raylm.runner (config, manifest, Ray, typed output).
"""

from raylm.runner import entrypoint

if __name__ == "__main__":
    entrypoint("generate")
