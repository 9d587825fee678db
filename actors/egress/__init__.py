"""Egress policy (docs/egress.md): where a net:egress task may connect, and the
host-side proxy that enforces it. The guest has no NIC: its only way out is a
virtio-serial port whose streams end at EgressProxy, which connects only where
the task's rules and the always-denied set allow."""
