"""Weights in, safely: pipeline folders and the embedded model (pipeline.py), the safety rules every load goes
through (safety.py), original-layout single-file checkpoints (single_file.py), a folder's description (info.py)."""
