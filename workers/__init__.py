"""Celery workers: one per GPU and model, applying that model's jobs strictly in order."""
