"""Train job: Ray Train + DeepSpeed pt / sft / dpo; resubmitting resumes (raylm.train.job).

The entrypoint `ray job submit -- python jobs/train.py CONFIG.yaml key=value ...` names;
every job runs through raylm.runner (config, manifest, Ray, typed output).
"""

from raylm.runner import entrypoint

if __name__ == "__main__":
    entrypoint("train")
