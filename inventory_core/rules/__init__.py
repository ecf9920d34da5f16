"""The handlers of every command kind, grouped by capability.

A handler is ``(state, command, at) -> Outcome``: it decides, and when it accepts it changes
the state and appends its events to ``at.events``. It is called only with a validated
command, after due expiries ran and the idempotency table found no earlier answer
(``_partition.py``); a refusal must leave the state untouched.
"""
