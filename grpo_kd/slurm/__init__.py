"""Running the loop: the chain of phases (plan.py), the local executor (local.py), and SLURM: sbatch scripts
from templates/ (scripts.py), submission with afterok dependencies (submit.py), status (status.py), and which
shard an array task owns (shards.py)."""
