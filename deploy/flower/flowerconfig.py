"""Flower settings for PocoFlow workers: ``pocoflow flower`` or
``celery -A workers.app flower --conf=deploy/flower/flowerconfig.py``."""

port = 5555
address = "127.0.0.1"  # put a reverse proxy with auth in front before exposing it
# Keeps the task list bounded: a busy cluster runs thousands of steps an hour.
max_tasks = 10000
purge_offline_workers = 300
