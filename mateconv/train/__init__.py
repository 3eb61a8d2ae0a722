"""Training: the stage recipes (stages.py) and the engine they share (engine.py)."""
