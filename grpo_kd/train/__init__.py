"""grpo_kd.train"""
