"""Tests on real guest VMs under libvirtd, through real corrald trees and
processes: each is marked `vm` (tests/conftest.py)."""
