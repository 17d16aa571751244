"""Serve job: deploy a long-lived OpenAI-compatible Ray Serve app (raylm.serve.job).

The entrypoint `ray job submit -- python jobs/serve.py CONFIG.yaml key=value ...` names;
every job runs through raylm.runner (config, manifest, Ray, typed output).
"""

from raylm.runner import entrypoint

if __name__ == "__main__":
    entrypoint("serve")
