"""The user's door: the ``mmcurate`` CLI and (later) cluster submission and scheduling."""
