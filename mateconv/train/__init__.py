"""The training engine shared by pretraining, SFT and DPO (see engine.py)."""
