"""Lenses: plain functions of a Trace and the model's weights, one module per method."""
