"""Plug points of the virtualization layer (DESIGN.md: qemu and libvirt drivers)."""

from zope.interface import Attribute, Interface


class IVmDriver(Interface):
    """Runs VMs: the qemu driver owns QEMU children; a libvirt driver would use libvirtd."""

    vms = Attribute("dict of vm id -> VM object (VmBase)")

    def create(vm_id, params):
        """Register and start a VM from vmParams (with libvirt domain XML); returns
        its definition with status WaitForLaunch at once. Raises ApiError."""

    def destroy(vm_id, grace=None):
        """Stop the VM (graceful, then signals) and release it; a Deferred."""

    def get(vm_id):
        """The VM, or raise NoSuchVM."""

    def list():
        """Every VM, running or Down."""
