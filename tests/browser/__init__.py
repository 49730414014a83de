"""Real-browser tests: JupyterLab / Notebook 7 in headless Debian Chromium, driven by Playwright."""
