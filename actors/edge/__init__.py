"""The edge: what faces corrald's callers and operators, outside the actors.

    intake_server.py  IntakeServer: the callers' ROUTER socket thread, request
                      validation and the ledger (each task answered once)
    control.py        ControlServer: the operators' socket (status, SCRAM, drain, ...)
    identity.py       who a caller is, what it may ask for (Admission, CurveZMQ, ZAP)
    budget.py         what a task costs and what each identity may spend
    connections.py    who is connected, how many may be, where an answer may go
    endpoint.py       endpoints corrald binds; the socket threads' start-up
    metrics.py        the Prometheus registry every actor updates

These are threads and plain objects, not actors: they may block on their own
sockets, and they reach the actors only by telling them messages (through a
Directory, or the service they are handed).

May import: actors' plumbing (errors.py, messages.py, directory.py),
artifacts/, protocol/ and config/, and each other. Never vm/ nor an actor
module (intake.py, scheduler.py, ...): the actors import the edge, not the
other way round.
"""
