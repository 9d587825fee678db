"""Artifacts: files into and out of a task's VM, host side.

    files.py     files in (checked against the caps before a task is accepted)
                 and out (collected under the cap as the guest streams them,
                 then given receipts)
    signing.py   the host's Ed25519 key that signs those receipts

Plain functions and objects, no threads: the IntakeServer checks files in,
the Supervisor collects files out (its reply is actors/replies.py).

May import: actors/errors.py and protocol/ (the receipt format is
protocol/wire/receipts.py, shared with callers who verify). Nothing else of
actors/: the edge and the actors import artifacts, not the other way round.
"""
