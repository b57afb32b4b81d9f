"""Known gap (review R4), pinned by a strict xfail until it is fixed.

With Redis as the broker the sweeper reads the step queues' lengths
(``BrokerSentinel.busy``): a queued step that waited ``REQUEUE_AFTER_S`` (60 s) while
messages still wait in the broker is most likely behind them, so it is held back (up to
``REQUEUE_CAP_S``) instead of sent again. With ``amqp://`` ``broker_sentinel`` returns
None, so the sweeper has no view of RabbitMQ's backlog at all: every step still waiting
after 60 s behind a long queue is re-sent, and again every 60 s, which multiplies the
backlog (the copies are refused by the claim, never run twice, but they queue). The fix:
a RabbitMQ view whose ``busy`` reads the queues' ``message_count`` (passive
``queue_declare``) and whose ``lost`` is always False."""

from __future__ import annotations

import pytest

from pocoflow.distributed import sweeper


@pytest.mark.xfail(
    strict=True,
    reason="R4: no view of a RabbitMQ backlog; waiting steps are re-sent every 60 s",
)
def test_the_sweeper_has_a_view_of_a_rabbitmq_backlog() -> None:
    view = sweeper.broker_sentinel("amqp://guest:guest@127.0.0.1:5672//")
    assert view is not None and callable(getattr(view, "busy", None))
