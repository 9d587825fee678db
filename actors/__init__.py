"""corral's host side: the actors and the layers they own (hypervisor, guest link)."""
