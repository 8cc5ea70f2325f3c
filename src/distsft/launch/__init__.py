"""The host, before and around the ranks: rendering the launcher files (run_files), `distsft run` on
this machine (local), `distsft prepare`, SLURM submission (slurm) and the `--wait` follower (follow)."""
