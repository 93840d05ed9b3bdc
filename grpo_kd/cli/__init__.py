"""grpo_kd.cli"""
