"""Studies: multi-run experiments built on lenses and fine-tuning (imported on first use).

icl.py: in-context learning vs gradient-descent fine-tuning, layer by layer (`compare_icl_gd`).
"""
