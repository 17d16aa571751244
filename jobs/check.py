"""Smoke job: a few Ray tasks report where they ran and what stack they see.

The entrypoint `ray job submit -- python jobs/check.py CONFIG.yaml key=value ...` names;
every job runs through raylm.runner (config, manifest, Ray, typed output).
"""

from raylm.runner import entrypoint

if __name__ == "__main__":
    entrypoint("check")
