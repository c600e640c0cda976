"""Integrations with training frameworks. Each module imports its framework only when imported itself:
`import gradwatch` never loads them.

    ray.py          Ray Train: attach inside `train_loop_per_worker`, rank from the train context (extra `ray`)
    lightning.py    PyTorch Lightning: `GradwatchCallback` (extra `lightning`)
    huggingface.py  Hugging Face Transformers Trainer: `GradwatchCallback` (extra `huggingface`)
"""
