"""Measuring this machine: compute, memory, codec and flash read figures written as a device profile."""
