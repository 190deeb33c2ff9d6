"""Bridges to other tools of the field, above the stages they reuse (lm-evaluation-harness)."""
