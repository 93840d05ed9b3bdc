"""grpo_kd.evaluate"""
