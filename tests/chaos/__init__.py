"""``make chaos``: long fault rounds against real processes (see ``runner``)."""
