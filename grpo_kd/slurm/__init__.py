"""grpo_kd.slurm"""
