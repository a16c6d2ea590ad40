"""Seeded scripts that pretrain the small base models shipped in ``loratui/tiny_models/pretrained``.

Run ``python -m loratui.tiny_models.pretrain image|text``; each reproduces its shipped model's quality on a
CPU (not bit-exact).
"""
