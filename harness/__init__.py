"""Test and benchmark harness (not part of the lensviz package): browser.py drives real notebook servers."""
