"""The VM layer: corral's VMs under libvirt and the host's end of each guest's
channel. No actor logic; the per-VM Supervisor (actors/supervisor.py) drives it.

    host.py           the Hypervisor: create or restore, destroy, pause, resume, reap VMs
    snapshots.py      snapshot templates on disk: key, save image header, clone XML, store
    libvirt_calls.py  every libvirt call under a deadline; libvirt's errors mapped
    domain.py         a VM's domain as typed data and its libvirt XML
    handle.py         what a caller holds of one VM (VmHandle, LibvirtRunControl)
    overlays.py       a VM's files: the qcow2 overlay, shared image files kept root's
    accelerator.py    KVM or TCG; whether QEMU's user can open /dev/kvm
    qmp.py            pause and resume through QEMU's own monitor (vm.fast_resume)
    guest_link.py     a synchronous host end of the channel (checks, benchmarks, tests)
    tiers.py          hardware tiers for the hard capabilities
    faults.py         faults made on purpose (tests, `corral admin fault`)
    errors.py         the layer's failures: HypervisorError and its kinds (RestoreFailed...),
                      GuestTimeout, ChannelClosed

May import: the standard library, libvirt, actors.errors (CorralError, the root
of every host error), protocol.channel and protocol.hostcrc (what the guest
speaks), guest.image.paths (where the built guest lives). Never the actors,
actors.edge, actors.artifacts, protocol.wire or the image builder.
"""
