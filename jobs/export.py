"""Export job: LoRA adapters merged shard by shard and checked (raylm.export.job).

The entrypoint `ray job submit -- python jobs/export.py CONFIG.yaml key=value ...` names;
every job runs through raylm.runner (config, manifest, Ray, typed output).
"""

from raylm.runner import entrypoint

if __name__ == "__main__":
    entrypoint("export")
