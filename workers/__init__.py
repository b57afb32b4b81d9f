"""PocoFlow's Celery workers: ``celery -A workers.app worker`` (or ``pocoflow worker``)."""
