"""Shared plumbing of the microVM drivers: guest kernel, initramfs, disks, host probes."""
