"""Packed binary kernels, installed as ``lightning_ovsw.kernels``.

``reference`` is the plain PyTorch oracle of every op (and the fallback path).
"""
