"""Flower settings for PocoFlow workers, for ``celery -A workers.app flower
--conf=deploy/flower/flowerconfig.py``. ``pocoflow flower`` needs no file: it passes the
same bounds itself (``pocoflow.cli_worker.FLOWER_DEFAULTS``)."""

port = 5555
address = "127.0.0.1"  # put a reverse proxy with auth in front before exposing it
# Keeps the task list bounded: a busy cluster runs thousands of steps an hour.
max_tasks = 10000
purge_offline_workers = 300
