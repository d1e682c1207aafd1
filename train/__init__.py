"""Prefix training under DeepSpeed: `deepspeed --module train ...` or `python -m train ...` (see train/loop.py)."""
