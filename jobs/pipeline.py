"""Pipeline job: data -> train -> eval -> gate -> serve as Ray jobs (raylm.pipeline.job).

The entrypoint `ray job submit -- python jobs/pipeline.py CONFIG.yaml key=value ...` names;
every job runs through raylm.runner (config, manifest, Ray, typed output).
"""

from raylm.runner import entrypoint

if __name__ == "__main__":
    entrypoint("pipeline")
