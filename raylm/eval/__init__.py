"""Evaluation: perplexity and generation metrics with bootstrap intervals, and the gate.

The pipeline needs only ``gate(results, GateConfig) -> Verdict`` on the content of a
finished job's ``eval.json``; nothing here imports torch until a model is scored.
"""

from raylm.eval.config import EvalJobConfig, GateConfig, ImprovementConfig
from raylm.eval.gate import Verdict, gate

__all__ = ["EvalJobConfig", "GateConfig", "ImprovementConfig", "Verdict", "gate"]
