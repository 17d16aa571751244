"""The export stage: a trained model made into what an engine serves (merged, checked)."""
