"""The sbatch script of one phase of one iteration, rendered from the templates in `grpo_kd/slurm/templates/`.

    text = render_script(cfg, paths, Step(1, "cache-teacher"))

A script is thin (STYLE.md point 11): a header that says what the job does, `#SBATCH` lines with the phase's
resources from `cfg.slurm`, the `cfg.slurm.setup` lines, and one `srun grpo-kd <phase> --config RUN/config.yaml
--iteration N "$@"`, wrapped in a trap that forwards the pre-timeout signal and requeues. A multi-GPU update
starts `torchrun` under `srun`, one per node, with a c10d rendezvous on the first node.

Key design choice: every value that reaches the script from outside (paths, names, partitions, user options)
goes through `shlex.quote`, in the command and in the `#SBATCH` lines alike (sbatch reads a directive's
argument with shell-like quoting), and comment text loses its line breaks, so a run directory such as
`runs/it's a $(rm -rf ~) run` is one inert word. Backslashes and line breaks in paths are refused: sbatch
treats a backslash as an escape even inside quotes.
"""

from __future__ import annotations

import re
import shlex
import sys
import textwrap
from importlib import resources
from pathlib import Path

from grpo_kd.config import Config, SlurmPhaseConfig
from grpo_kd.errors import GrpoKdError
from grpo_kd.paths import TRAINING_PHASES, RunPaths, iteration_name
from grpo_kd.slurm.plan import Step, num_tasks, phase_args
from grpo_kd.train.signals import REQUEUE_EXIT_CODE


WHAT = {
    "sft": "the student is fine-tuned on the SFT data before iteration 1 (phase 0; checkpoints/iter_0000)",
    "rollout": "the student samples a group of completions per prompt and stores them with their log-probs",
    "cache-teacher": "the teacher scores every rollout token (top-k log-probs) into the teacher cache",
    "update": "the student trains on the rollouts and the teacher cache and writes its checkpoint",
}


def template(name: str) -> str:
    return resources.files("grpo_kd.slurm").joinpath("templates", name).read_text(encoding="utf-8")


def fill(text: str, **values: str) -> str:
    """Replace each `{{name}}`; a placeholder without a value (or a value without a placeholder) is a bug."""
    found = set(re.findall(r"\{\{(\w+)\}\}", text))
    if found != set(values):
        raise KeyError(f"template placeholders {sorted(found)} do not match the values {sorted(values)}")
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def phase_resources(cfg: Config, phase: str) -> SlurmPhaseConfig:
    return getattr(cfg.slurm, phase.replace("-", "_"))


def bin_dir(cfg: Config) -> Path:
    """Where `grpo-kd` (and `torchrun`) are: configured, else next to the running Python (its venv's bin)."""
    return Path(cfg.slurm.bin_dir or Path(sys.executable).absolute().parent)


def log_pattern(paths: RunPaths, step: Step, array: bool) -> Path:
    """The job's output file, with sbatch's `%j` (job id) or `%A_%a` (array job id and task) left in."""
    return paths.slurm / "logs" / f"{iteration_name(step.iteration)}-{step.phase}-{'%A_%a' if array else '%j'}.log"


def script_path(paths: RunPaths, step: Step) -> Path:
    return paths.slurm / f"{iteration_name(step.iteration)}-{step.phase}.sbatch"


def is_distributed(cfg: Config, step: Step) -> bool:
    res = phase_resources(cfg, step.phase)
    return step.phase in TRAINING_PHASES and res.nodes * max(res.gpus_per_node, 1) > 1


# ---------------------------------------------------------------------------------------------- rendering


def render_script(cfg: Config, paths: RunPaths, step: Step) -> str:
    for path in (paths.root, Path(cfg.slurm.workdir or ".")):
        _check_path(path)
    res = phase_resources(cfg, step.phase)
    tasks = num_tasks(cfg, step.phase)
    prelude, launch = _launch(cfg, paths, step)
    if cfg.slurm.requeue:
        # torchrun dies of USR2 but passes TERM on to its workers; a single process handles USR2 itself
        forward = "TERM" if is_distributed(cfg, step) else "USR2"
        body = fill(template("requeue.sh"), signal_seconds=str(cfg.slurm.signal_seconds), launch=launch,
                    forward=forward, requeue_code=str(REQUEUE_EXIT_CODE)).rstrip("\n")
    else:
        body = f'{launch} "$@"'
    description = (
        f"grpo-kd run {cfg.name}, iteration {step.iteration}, {step.phase}: {WHAT[step.phase]}"
        + (f"; an array of {tasks} tasks, task j owns shard j" if tasks > 1 else "")
        + f". Time limit --time={res.time} per attempt"
        + (", requeued on the pre-timeout signal." if cfg.slurm.requeue else ".")
    )
    return fill(
        template("job.sbatch"),
        description="\n# ".join(textwrap.wrap(_comment(description), 110)),
        directives="\n".join(f"#SBATCH {d}" for d in sbatch_directives(cfg, paths, step)),
        setup="".join(line + "\n" for line in [*cfg.slurm.setup, *prelude]),
        body=body,
    )


def sbatch_directives(cfg: Config, paths: RunPaths, step: Step) -> list[str]:
    """`--option=value` strings with quoted values, in the order they appear in the script."""
    res = phase_resources(cfg, step.phase)
    tasks = num_tasks(cfg, step.phase)
    q = shlex.quote
    job_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"gk.{cfg.name}.{step.iteration}.{step.phase}")[:100]
    log = str(log_pattern(paths, step, array=tasks > 1))
    log = log[: log.rindex("/") + 1].replace("%", "%%") + log[log.rindex("/") + 1 :]  # a literal % in the dir
    out = [f"--job-name={q(job_name)}", f"--output={q(log)}", f"--chdir={q(cfg.slurm.workdir or '.')}"]
    out += [f"--nodes={res.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={res.cpus_per_task}"]
    if res.gpus_per_node > 0:
        out.append(f"--gpus-per-node={res.gpus_per_node}")
    out += [f"--mem={q(res.mem)}", f"--time={q(res.time)}"]
    for option, value in (("partition", res.partition or cfg.slurm.partition), ("account", cfg.slurm.account),
                          ("qos", cfg.slurm.qos)):  # fmt: skip
        if value:
            out.append(f"--{option}={q(value)}")
    if tasks > 1:
        throttle = f"%{cfg.slurm.array_parallelism}" if cfg.slurm.array_parallelism > 0 else ""
        out.append(f"--array=0-{tasks - 1}{throttle}")
    if cfg.slurm.requeue:
        out += ["--requeue", "--open-mode=append", f"--signal=B:USR2@{cfg.slurm.signal_seconds}"]
    out += [q(arg) for arg in cfg.slurm.sbatch_args]
    return out


def _launch(cfg: Config, paths: RunPaths, step: Step) -> tuple[list[str], str]:
    """(lines before the launch, the launch command without "$@"), every word quoted."""
    tools = bin_dir(cfg)
    args = phase_args(step, paths.config)
    if not is_distributed(cfg, step):
        return [], " ".join(["srun", shlex.quote(str(tools / "grpo-kd")), *map(shlex.quote, args)])
    res = phase_resources(cfg, step.phase)
    prelude = ['head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)']
    torchrun = [
        "srun", "--ntasks-per-node=1", shlex.quote(str(tools / "torchrun")),
        '--nnodes="$SLURM_JOB_NUM_NODES"', f"--nproc-per-node={max(res.gpus_per_node, 1)}",
        "--rdzv-backend=c10d", f'--rdzv-endpoint="$head_node:{cfg.slurm.rendezvous_port}"',
        '--rdzv-id="$SLURM_JOB_ID"', "-m", "grpo_kd.cli.app",
    ]  # fmt: skip
    return prelude, " ".join([*torchrun, *map(shlex.quote, args)])


def _comment(text: str) -> str:
    """One comment line: no line breaks can end it early."""
    return re.sub(r"[\r\n\x00-\x1f]+", " ", text)


def _check_path(path: Path) -> None:
    text = str(path)
    if "\\" in text or "\n" in text or "\r" in text:
        raise GrpoKdError(f"{text!r}: a path for SLURM may not contain a backslash or a line break")
