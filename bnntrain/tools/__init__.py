"""The tools beside the trainer, each a command: evaluate, export, convert, summary; and the
ablation table a sweep writes (ablation.py)."""
