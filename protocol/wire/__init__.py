"""The wire of callers and operators: what clients and `corral admin` say to
corrald over ZeroMQ, and the signed receipts that come back with files.

Host side only (never on the guest's ISO). A module here imports the standard
library, protocol.channel (the codec and its bounds) and protocol.wire;
receipts.py also cryptography. Never zmq (sockets belong to corrald and the
client, which hand frames to envelope.py), never protocol.client or actors.

- ``envelope``  the [b"", TAG, payload] ZeroMQ frames every payload travels in
- ``tasks``     the caller protocol: TaskRequest/TaskReply, StatusRequest/StatusReply,
                ErrorCode (every error code a task can be answered with)
- ``outcomes``  the one word in each TaskReply for what became of the command
- ``control``   the operator protocol: AdminRequest/AdminReply
- ``receipts``  signed receipts for collected files, and their offline check
"""
