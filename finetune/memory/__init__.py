"""Memory: the planner that predicts peak VRAM per phase from the real architecture (planner.py)."""
