"""Issue 13, case 3: a cross-tokenizer teacher pass whose last batch ends with a completion that decodes to "".

A completion that is only the end-of-sequence token decodes to the empty text, which the teacher re-tokenises
to no token at all; sorted by length, that row is the last of the last batch, where the row-sum of the
teacher's log-probs indexed one past the end (`np.add.reduceat`, IndexError). Since the teacher's log-probs are
aligned onto the student's tokens, such a row holds the teacher's end of turn only (on the student's eos).
"""

from __future__ import annotations

import numpy as np

from grpo_kd.cache.rollouts import RolloutRecord, write_rollout_shard


def test_a_completion_that_decodes_to_nothing_ends_the_last_batch(fault_config, tiny_student_other_vocab):
    from grpo_kd.cache.reader import CacheReader
    from grpo_kd.cache.verify import verify_run
    from grpo_kd.models import load_tokenizer
    from grpo_kd.paths import RunPaths
    from grpo_kd.slurm.plan import prepare_run
    from grpo_kd.train.phases import run_phase

    cfg = fault_config(**{"teacher.path": tiny_student_other_vocab})
    prepare_run(cfg)
    tokenizer = load_tokenizer(cfg.model.path)
    prompt = tokenizer("Í Føroyum er", add_special_tokens=True)["input_ids"]
    texts = ["ein góður dagur", "og so", "vit", None]  # None: the eos alone
    records = []
    for group in range(2):
        for sample, text in enumerate(texts):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            ids = ids + [tokenizer.eos_token_id]
            records.append(RolloutRecord(prompt_id=f"p{group}", group_id=group, sample_index=sample,
                                         prompt_ids=prompt, completion_ids=ids, old_logprobs=[-1.0] * len(ids),
                                         finish_reason="stop", prompt_text="Í Føroyum er",
                                         completion_text=tokenizer.decode(ids, skip_special_tokens=True)))
    assert records[3].completion_text == ""
    paths = RunPaths.of(cfg.run_dir)
    write_rollout_shard(paths.rollouts(1), 0, records, meta={"sampling": {"group_size": 4}})

    run_phase(cfg, "cache-teacher", 1)

    assert verify_run(paths.root, 1).ok
    batch = CacheReader.open(paths.rollouts(1), paths.teacher(1)).batch([0, 1])
    tokens, logprob = batch.teacher_seq_tokens.numpy(), batch.teacher_seq_logprob.numpy()
    alone = [3, 7]  # the eos alone: the teacher scores its own end of turn, and nothing of the (empty) text
    assert (tokens[alone] >= 1).all() and (tokens[alone] < np.delete(tokens, alone).min()).all()
    assert np.isfinite(logprob).all() and (logprob < 0).all()
