"""Tests without VMs (no libvirtd, no gold image): the fast half of the suite."""
