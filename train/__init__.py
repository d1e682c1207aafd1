"""Prefix training under DeepSpeed: `deepspeed -m train ...` or `python -m train ...` (see train/loop.py)."""
