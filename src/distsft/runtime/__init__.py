"""This process on this machine: the one reader of RANK / WORLD_SIZE / SLURM_* (dist.env), collectives
helpers, hardware detection, console filters, rendezvous ports. No torch at import."""
