"""Bridges to other interpretability tools: inputs for their viewers built from a lensviz Trace.

bertviz.py: `to_bertviz(trace, kind, layers)` -> what bertviz's head_view / model_view accept.
"""
