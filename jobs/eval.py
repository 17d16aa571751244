"""Eval job: metrics with confidence intervals and the deployment gate (raylm.eval.job).

The entrypoint `ray job submit -- python jobs/eval.py CONFIG.yaml key=value ...` names;
every job runs through raylm.runner (config, manifest, Ray, typed output).
"""

from raylm.runner import entrypoint

if __name__ == "__main__":
    entrypoint("eval")
