"""grpo_kd.cache"""
