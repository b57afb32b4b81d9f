"""The distributed executor: every node step a Celery task, crashed steps re-run by
themselves (ARCHITECTURE §3, G1-G7).

Modules, one job each:

* ``message``   the step message (frozen, JSON only, ids only)
* ``celery_app``  the Celery app every process builds the same way
* ``publish``   sending step messages (a failed send is left to the sweeper)
* ``executor``  the step protocol a worker runs for one message
* ``graphs``    registry lookups cached per process, version (fingerprint) refusals
* ``lifecycle`` run-level transitions as compare-and-set ledger updates
* ``control``   Redis cancel/pause flags and ``RemoteControl`` for ``RunHandle``
* ``sweeper``   re-sends unsent outbox rows, takes over expired leases
* ``client``    ``submit``, ``attach``, ``resume_run``, ``fork_run``

Importing this package loads neither Celery nor Redis; they load on first use.
"""
