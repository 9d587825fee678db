"""The caller's and the operator's side: what runs outside corrald to talk to it.

A module here imports the standard library, zmq, protocol.wire,
protocol.channel and protocol.client; config only inside the function that
needs it (a default endpoint or key path), so importing the client reads no
file. Never actors: a client needs nothing of the daemon.

- ``api``     the client library: Client, TaskStream (live output, stdin), its errors, CurveZMQ keys
- ``cli``     the ``corral`` command line (``python -m protocol.client`` runs it too)
- ``admin``   ``corral admin``: one request to corrald's control socket
- ``reach``   is corrald there? tells not_running from permission_denied at once

Import Client from protocol.client.api: this package exports nothing itself.
"""
