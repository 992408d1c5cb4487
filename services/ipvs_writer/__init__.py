"""ipvs-writer: the single process that owns the desired state and writes it to the kernel's IPVS."""
