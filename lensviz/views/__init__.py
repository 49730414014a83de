"""Views: what the notebook shows (the Explorer widget, its payloads, the %%lensviz magic)."""
