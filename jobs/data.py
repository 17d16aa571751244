"""Data job: raw corpora -> cleaned, deduplicated (tokenized) Parquet shards (raylm.data.job).

The entrypoint `ray job submit -- python jobs/data.py CONFIG.yaml key=value ...` names;
every job runs through raylm.runner (config, manifest, Ray, typed output).
"""

from raylm.runner import entrypoint

if __name__ == "__main__":
    entrypoint("data")
