"""Online RL's pure components (issue 19): GRPO advantages and losses checked against TRL
1.16, PPO's GAE and value loss, rule-based verifiers, and their typed config. No Ray and
no vLLM here; the train job's grpo / ppo stages build on these (see docs/rl.md)."""
