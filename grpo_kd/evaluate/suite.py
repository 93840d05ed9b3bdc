"""Run the chosen evaluation suites on one checkpoint and write the result as JSON, markdown and a PNG.

    result = evaluate_checkpoint("runs/x/checkpoints/iter_0002", "runs/tiny-models/teacher",
                                 suites=["perplexity", "distill", "diversity"], cfg=cfg)
    result["distill"]["reverse_kl"], result["perplexity"]["bits_per_byte"], result["diversity"]["distinct_2"]

Key design choices: every input a suite needs (FoQA file, held-out text, prompts, a teacher with a matching
vocabulary, EuroEval on PATH) is resolved *before* a model is loaded, so a bad input costs a second, not a
model load; the student and the teacher are never in memory together (the student is freed before the teacher
is loaded); and one set of sampled completions serves both `distill` and `diversity`.
"""

from __future__ import annotations

import re
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from grpo_kd.config import Config
from grpo_kd.device import release_memory
from grpo_kd.errors import GrpoKdError
from grpo_kd.evaluate import diversity as div
from grpo_kd.evaluate.euroeval import INSTALL_HINT, euroeval_launcher, run_euroeval
from grpo_kd.evaluate.export import export_checkpoint, is_standalone
from grpo_kd.evaluate.foqa import QAExample, evaluate_foqa, load_qa, split_shots
from grpo_kd.evaluate.generation import generate
from grpo_kd.evaluate.loading import checkpoint_tokenizer, load_checkpoint

SUITES = ("foqa", "perplexity", "distill", "diversity", "euroeval")
_ITERATION = re.compile(r"iter_(\d+)$")


def parse_suites(suites: str | Sequence[str]) -> list[str]:
    names = [s.strip() for s in (suites.split(",") if isinstance(suites, str) else suites) if s.strip()]
    unknown = [s for s in names if s not in SUITES]
    if unknown or not names:
        raise GrpoKdError(f"unknown suite {unknown[0]!r}; choose from {', '.join(SUITES)}" if unknown else "no suite given")
    return list(dict.fromkeys(names))


def locate_run(checkpoint: str | Path) -> tuple[Path | None, int | None]:
    """(run directory, iteration) when `checkpoint` is RUN/checkpoints/iter_NNNN (or its model/), else (None, None)."""
    path = Path(checkpoint).expanduser().resolve()
    if path.name == "model" and path.parent.parent.name == "checkpoints":
        path = path.parent
    if path.parent.name != "checkpoints":
        return None, None
    match = _ITERATION.search(path.name)
    return path.parent.parent, int(match.group(1)) if match else None


@dataclass
class SuiteInputs:
    """What the suites read, resolved before any model is loaded."""

    suites: list[str]
    foqa: tuple[list[QAExample], list[QAExample]] | None = None  # (shots, evaluated)
    texts: list[str] | None = None
    prompts: list[str] | None = None
    teacher: str | None = None
    same_vocabulary: bool = True
    informed_prompts: list[str] | None = None  # distill against the informed self: the prompts it sees


# ---------------------------------------------------------------------------------------------- inputs


def heldout_prompts(cfg: Config, tokenizer, *, privileged_template: str | None = None) -> list[str]:
    """Held-out prompts: data.heldout_prompts, else a held-out slice of data.prompts, else the first
    `eval.prompt_words` words of each sentence of eval.heldout_text; rendered as in training (chat template).
    With `privileged_template`, the same prompts as the privileged self-teacher sees them (each needs its
    privileged information: data.privileged_field, or the rest of the sentence with data.prefix_words)."""
    from grpo_kd.data import load_prompts, prompts_from_config, render_prompt, split_heldout

    limit = cfg.eval.max_examples
    if privileged_template is not None and not (cfg.data.heldout_prompts or cfg.data.prompts):
        raise GrpoKdError("distill against the informed self needs held-out prompts with privileged information: "
                          "set data.heldout_prompts (with data.privileged_field or data.prefix_words) or data.prompts")
    if cfg.data.heldout_prompts:
        privileged_field = cfg.data.privileged_field if privileged_template is not None else None
        prompts = load_prompts(cfg.data.heldout_prompts, format=cfg.data.format, prompt_field=cfg.data.prompt_field,
                               privileged_field=privileged_field, limit=limit, prefix_words=cfg.data.prefix_words)
    elif cfg.data.prompts:
        _, prompts = split_heldout(prompts_from_config(cfg.data), cfg.data.heldout_fraction, cfg.seed)
        if not prompts:
            raise GrpoKdError("data.prompts leaves no held-out prompts; set data.heldout_fraction > 0 or data.heldout_prompts")
    elif cfg.eval.heldout_text:
        prompts = load_prompts(cfg.eval.heldout_text, prefix_words=cfg.eval.prompt_words, limit=limit)
    else:
        raise GrpoKdError("distill/diversity need held-out prompts: set data.heldout_prompts, data.prompts or eval.heldout_text")
    return [render_prompt(tokenizer, p, chat_template=cfg.data.chat_template, privileged_template=privileged_template)
            for p in prompts[:limit]]


def _foqa_inputs(source: str, cfg: Config) -> tuple[list[QAExample], list[QAExample]]:
    ev = cfg.eval
    local = Path(source).expanduser().exists()
    examples = load_qa(source, split=ev.foqa_split)
    train = None
    if ev.foqa_train:
        train = load_qa(ev.foqa_train, split="train")
    elif not local or Path(source).is_dir():
        train = load_qa(source, split="train")
    shots, evaluated = split_shots(examples, ev.foqa_shots, train, seed=cfg.seed)
    return shots, evaluated[: ev.max_examples]


def _check_teacher(checkpoint_tokenizer, teacher: str, cfg: Config) -> bool:
    from grpo_kd.models import load_tokenizer, same_vocabulary, tokenizer_fingerprint

    student_fp = tokenizer_fingerprint(checkpoint_tokenizer)
    teacher_fp = tokenizer_fingerprint(load_tokenizer(teacher, trust_remote_code=cfg.teacher.trust_remote_code))
    if same_vocabulary(student_fp, teacher_fp):
        return True
    if not cfg.eval.distill_cross_tokenizer:
        raise GrpoKdError(
            f"distill: the student's vocabulary ({student_fp['name']}, V={student_fp['vocab_size']}) differs from the "
            f"teacher's ({teacher_fp['name']}, V={teacher_fp['vocab_size']}); token-level KL needs a shared vocabulary. "
            "Set eval.distill_cross_tokenizer=true to report only the teacher's score of the text"
        )
    return False


def drop_unavailable_euroeval(suites: list[str]) -> tuple[list[str], list[str]]:
    """(suites, warnings): without EuroEval installed, `euroeval` alone is an error, beside others a warning."""
    if "euroeval" not in suites or euroeval_launcher() is not None:
        return suites, []
    if suites == ["euroeval"]:
        raise GrpoKdError(INSTALL_HINT)
    return [s for s in suites if s != "euroeval"], [f"euroeval skipped: {INSTALL_HINT}"]


def resolve_inputs(suites, cfg: Config, tokenizer, *, teacher=None, prompts=None, texts=None, foqa=None) -> SuiteInputs:
    """Check and load every input of `suites`; one clear `GrpoKdError` for the first that is missing."""
    from grpo_kd.data import load_texts

    inputs = SuiteInputs(suites=list(suites))
    if "foqa" in inputs.suites:
        source = foqa or cfg.eval.foqa
        if not source:
            raise GrpoKdError("foqa: no FoQA data; pass --foqa FILE or set eval.foqa (a file or alexandrainst/foqa)")
        inputs.foqa = _foqa_inputs(str(source), cfg)
    if "perplexity" in inputs.suites:
        source = texts if texts is not None else cfg.eval.heldout_text
        if not source:
            raise GrpoKdError("perplexity: no held-out text; pass --text FILE or set eval.heldout_text")
        inputs.texts = list(source) if not isinstance(source, (str, Path)) else load_texts(str(source), limit=cfg.eval.max_examples)
    if "distill" in inputs.suites or "diversity" in inputs.suites:
        inputs.prompts = list(prompts) if prompts is not None else heldout_prompts(cfg, tokenizer)
    if "distill" in inputs.suites and not teacher and cfg.teacher.kind == "self_privileged":
        if prompts is not None:
            raise GrpoKdError("distill against the informed self renders its held-out prompts from the config, with "
                              "their privileged information; prompts cannot be given as text")
        inputs.informed_prompts = heldout_prompts(cfg, tokenizer, privileged_template=cfg.teacher.prompt_template)
    elif "distill" in inputs.suites:
        inputs.teacher = str(teacher) if teacher else (cfg.teacher.path if cfg.teacher.kind == "model" else None)
        if not inputs.teacher:
            raise GrpoKdError("distill: no teacher; pass --teacher DIR or set teacher.path")
        inputs.same_vocabulary = _check_teacher(tokenizer, inputs.teacher, cfg)
    return inputs


# ---------------------------------------------------------------------------------------------- the run


def evaluate_checkpoint(
    checkpoint: str | Path,
    teacher: str | Path | None = None,
    *,
    suites: str | Sequence[str] | None = None,
    cfg: Config | None = None,
    prompts: Sequence[str] | None = None,
    texts: str | Sequence[str] | None = None,
    foqa: str | None = None,
    baseline: dict | None = None,
    euroeval_dir: str | Path | None = None,
) -> dict:
    """Evaluate one model on `suites` (default `eval.suites`); returns
    `{"checkpoint", "teacher", "suites", <suite>: {...}, "warnings", "created", "seconds"}`.

    `prompts` (rendered text), `texts` and `foqa` override the config's sources; `baseline` is an earlier result
    (or its "diversity" section) for the collapse warning; `euroeval_dir` is where EuroEval runs.
    """
    cfg = cfg or Config()
    started = time.time()
    checkpoint = str(checkpoint)
    names, warnings = drop_unavailable_euroeval(parse_suites(suites or cfg.eval.suites))
    needs_model = any(s in names for s in ("foqa", "perplexity", "distill", "diversity"))
    tokenizer = checkpoint_tokenizer(checkpoint, cfg) if needs_model else None
    inputs = resolve_inputs(names, cfg, tokenizer, teacher=teacher, prompts=prompts, texts=texts, foqa=foqa)
    result: dict = {"checkpoint": checkpoint, "teacher": inputs.teacher, "suites": inputs.suites,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "warnings": warnings}
    student = None
    if needs_model:
        model = load_checkpoint(checkpoint, cfg)
        student = _student_suites(model, tokenizer, inputs, cfg, baseline, result)
        dropped = weakref.ref(model)
        del model  # the student leaves memory before the teacher comes in
        release_memory(dropped)
    if student is not None and inputs.informed_prompts is not None:
        informed = checkpoint if cfg.teacher.adapter else cfg.model.path  # the self-teacher cache-teacher uses
        result["teacher"] = f"{informed}, informed: teacher.prompt_template {cfg.teacher.prompt_template!r}"
        result["distill"] = _distill_informed(student, inputs, cfg, tokenizer, informed)
    elif student is not None:
        result["distill"] = _distill(student, inputs, cfg, tokenizer)
    if "euroeval" in inputs.suites:
        ev = cfg.eval
        work_dir = Path(euroeval_dir) if euroeval_dir else Path("reports") / "euroeval" / Path(checkpoint).name
        model = checkpoint
        if not is_standalone(checkpoint):  # an adapter or a training checkpoint: EuroEval loads a plain model
            model = str(export_checkpoint(checkpoint, work_dir / "model", cfg))
        result["euroeval"] = run_euroeval(model, work_dir, language=ev.euroeval_language, extra_args=ev.euroeval_args)
    result["seconds"] = round(time.time() - started, 2)
    return result


def _student_suites(model, tokenizer, inputs: SuiteInputs, cfg: Config, baseline: dict | None, result: dict):
    """FoQA, perplexity and diversity into `result`; returns the student's side of `distill` (or None)."""
    from grpo_kd.evaluate.perplexity import perplexity

    ev = cfg.eval
    if inputs.foqa is not None:
        shots, examples = inputs.foqa
        result["foqa"] = evaluate_foqa(model, tokenizer, examples, shots, batch_size=ev.batch_size,
                                       max_new_tokens=ev.max_new_tokens, language=ev.language)
    if inputs.texts is not None:
        result["perplexity"] = perplexity(model, tokenizer, inputs.texts, batch_size=ev.batch_size, max_tokens=ev.max_tokens)
    if inputs.prompts is None:
        return None
    samples = generate(model, tokenizer, inputs.prompts, max_new_tokens=ev.max_new_tokens, do_sample=True,
                       temperature=ev.temperature, batch_size=ev.batch_size, seed=cfg.seed, description="sampling",
                       add_special_tokens=not cfg.data.chat_template)
    if "diversity" in inputs.suites:
        result["diversity"] = _diversity(samples, baseline, cfg, result["warnings"])
    if "distill" not in inputs.suites:
        return None
    from grpo_kd.evaluate.distill import student_side

    return student_side(model, tokenizer, samples, inputs.prompts, ev.batch_size)


def _diversity(samples, baseline: dict | None, cfg: Config, warnings: list[str]) -> dict:
    ev = cfg.eval
    metrics = div.diversity_metrics([s.text for s in samples], [len(s.completion_ids) for s in samples], ev.repetition_n)
    metrics["samples"] = [s.text for s in samples[:10]]
    if baseline is not None:
        reference = baseline.get("diversity", baseline)
        collapse = div.collapse_warnings(metrics, reference, ev.collapse_ratio, ev.collapse_repetition_margin)
        metrics["collapse_warnings"] = collapse
        metrics["baseline"] = {k: reference.get(k) for k in ("distinct_1", "distinct_2", "distinct_3", "repetition_rate")}
        warnings.extend(f"possible mode collapse: {line}" for line in collapse)
    return metrics


def _distill(student, inputs: SuiteInputs, cfg: Config, student_tokenizer) -> dict:
    from grpo_kd.evaluate.distill import cross_tokenizer_score, distill_metrics
    from grpo_kd.models import load_causal_lm, load_tokenizer, tokenizer_length

    t = cfg.teacher
    teacher_model = load_causal_lm(inputs.teacher, dtype=t.dtype, device=cfg.model.device, load_in_4bit=t.load_in_4bit,
                                   device_map=t.device_map, trust_remote_code=t.trust_remote_code,
                                   vocab_size=tokenizer_length(inputs.teacher, trust_remote_code=t.trust_remote_code))
    teacher_model.eval().requires_grad_(False)
    try:
        if inputs.same_vocabulary:
            return distill_metrics(student, teacher_model, batch_size=cfg.eval.batch_size, pad_id=student_tokenizer.pad_token_id)
        teacher_tokenizer = load_tokenizer(inputs.teacher, trust_remote_code=t.trust_remote_code)
        return cross_tokenizer_score(student, teacher_model, teacher_tokenizer, batch_size=cfg.eval.batch_size)
    finally:
        dropped = weakref.ref(teacher_model)
        del teacher_model
        release_memory(dropped)


def _distill_informed(student, inputs: SuiteInputs, cfg: Config, tokenizer, informed: str) -> dict:
    """`distill` with the privileged self-teacher as the teacher: the model `informed` (the checkpoint itself with
    `teacher.adapter`, else the initial student) scores the student's samples with the privileged information in
    its prompts, exactly as cache-teacher conditions it."""
    from grpo_kd.data import encode_prompt
    from grpo_kd.evaluate.distill import distill_metrics

    prompt_ids = [encode_prompt(tokenizer, text, chat_template=cfg.data.chat_template) for text in inputs.informed_prompts]
    teacher_model = load_checkpoint(informed, cfg)
    try:
        return distill_metrics(student, teacher_model, batch_size=cfg.eval.batch_size, pad_id=tokenizer.pad_token_id,
                               teacher_prompt_ids=prompt_ids)
    finally:
        dropped = weakref.ref(teacher_model)
        del teacher_model
        release_memory(dropped)
