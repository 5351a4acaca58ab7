"""The qemu driver: the agent owns QEMU processes and drives them over QMP."""
